"""Stand-in of SGLang's compiled kernels package: importing it is what says they load."""
