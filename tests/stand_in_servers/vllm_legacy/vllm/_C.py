"""Stand-in of vLLM's compiled extension: importing it is what says the compiled ops load."""
