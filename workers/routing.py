"""Synthetic and captured expert routing for benchmark problems.

Routing changes a fused-MoE timing (how many tokens each expert gets decides how many M-tiles run
and how many experts' weights are read), so the tuner can time under the load a deployment sees:

- ``uniform``: every token picks ``topk`` distinct experts uniformly at random;
- ``zipf:<alpha>``: expert ``e`` has popularity ∝ 1/(e+1)^alpha (expert 0 the hottest; alpha 0 is
  uniform), still ``topk`` distinct experts per token;
- ``file:<path>``: ``topk_ids`` captured from a real router (``.pt`` tensor or ``.npy`` array,
  ``[rows, topk]``, global expert ids under expert parallelism); tokens take rows of a
  generator-drawn permutation, cycling when M > rows. ``pin_file`` makes the spec
  ``file:<absolute path>#sha256:<16 hex digits of the content>``, so a journal never hands back
  timings taken on another content of the same path; every load of a pinned file checks the
  content against that digest (``RoutingFileChanged``), so a file changed during a run, or
  between a run and its resume, is never timed under the old spec's journal key.

Under expert parallelism and SGLang's shared-expert fusion ``make_routing`` gives what one GPU's
kernel sees: picks on other GPUs' experts as -1, the always-routed shared expert in the last slot.

The synthetic kinds act like a router: logits = log(popularity) + Gumbel noise, the top-k logits
choose the experts (Gumbel-top-k samples without replacement in proportion to popularity) and the
weights are the softmax over the chosen logits. Captured ids get softmax weights over Gumbel
logits. Everything is drawn from the caller's generator, so a (spec, M, E, topk, seed) is repeatable.
"""

from __future__ import annotations

import hashlib
import io
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from workers.failures import InputChanged

if TYPE_CHECKING:
    from workers.records import MoEShape


@dataclass(frozen=True)
class RoutingSpec:
    """A parsed routing spec; ``str()`` gives back the canonical spec string."""

    kind: str
    alpha: float = 0.0
    path: str | None = None
    digest: str | None = None
    """``file`` only: the content's digest when pinned (``pin_file``)."""

    def __str__(self) -> str:
        if self.kind == "zipf":
            return f"zipf:{self.alpha:g}"
        if self.kind == "file":
            return f"file:{self.path}" + (f"{DIGEST_MARK}{self.digest}" if self.digest else "")
        return self.kind


DIGEST_MARK = "#sha256:"
DIGEST_HEX_DIGITS = 16


class RoutingFileChanged(InputChanged, ValueError):
    """A pinned routing file whose content no longer has the spec's digest: timings of it would be
    keyed as the old content's. Bad input where a command pins the spec; mid-run it ends the run
    (``workers.failures.InputChanged``), never a candidate's status."""


def content_digest(content: bytes) -> str:
    """The digest a pinned ``file:`` spec carries: the first 16 hex digits of the SHA-256 of the
    file's bytes (the one definition; pinning and every load use it)."""
    return hashlib.sha256(content).hexdigest()[:DIGEST_HEX_DIGITS]


def parse_routing(spec: str) -> RoutingSpec:
    """Parse ``uniform``, ``zipf:<alpha>`` (alpha finite, >= 0) or ``file:<path>``; ValueError otherwise."""
    kind, sep, arg = spec.partition(":")
    if kind == "uniform" and not sep:
        return RoutingSpec("uniform")
    if kind == "zipf" and sep:
        try:
            alpha = float(arg)
        except ValueError:
            raise ValueError(f"routing {spec!r}: alpha must be a number") from None
        if not math.isfinite(alpha) or alpha < 0:
            raise ValueError(f"routing {spec!r}: alpha must be finite and >= 0")
        return RoutingSpec("zipf", alpha=alpha)
    if kind == "file" and arg:
        path, _, digest = arg.partition(DIGEST_MARK)
        if Path(path).suffix not in (".pt", ".npy"):
            raise ValueError(f"routing {spec!r}: the file must be .pt or .npy")
        return RoutingSpec("file", path=path, digest=digest or None)
    raise ValueError(f"unknown routing {spec!r}: expected uniform, zipf:<alpha> or file:<path.pt|path.npy>")


def pin_file(spec: str) -> str:
    """``spec`` canonical; a ``file:`` routing with its absolute path and its content's digest
    (``content_digest``). What every command keys its journal on. ValueError when the file does
    not exist; ``RoutingFileChanged`` (a ValueError) when ``spec`` is pinned already and the
    content no longer matches its digest (resuming a run whose file was changed since)."""
    parsed = parse_routing(spec)
    if parsed.kind != "file":
        return str(parsed)
    path = Path(parsed.path).expanduser().resolve()
    if not path.is_file():
        raise ValueError(f"routing file {parsed.path}: no such file")
    digest = content_digest(_read_pinned(path, parsed.digest))
    return str(RoutingSpec("file", path=str(path), digest=digest))


def _read_pinned(path: Path, digest: str | None) -> bytes:
    """The bytes of ``path``; RoutingFileChanged naming the file when ``digest`` is given and
    the content's differs."""
    try:
        content = path.read_bytes()
    except OSError as exc:
        raise ValueError(f"routing file {path} is unreadable: {exc.strerror or exc}") from None
    if digest is not None and content_digest(content) != digest:
        raise RoutingFileChanged(f"routing file {path} changed since it was pinned (sha256 {digest}, now "
                                 f"{content_digest(content)}): its timings would be keyed as the old content's; "
                                 "restore the file or pass it as file:<path> to tune the new content")
    return content


def check_file(spec: str, shape: MoEShape) -> None:
    """A ``file:`` routing's ids checked against what ``shape``'s router picks from (its routed
    experts over all GPUs, its routed top-k) before any work; ValueError naming the file. Other
    kinds need no check."""
    parsed = parse_routing(spec)
    if parsed.kind == "file":
        load_topk_ids(parsed.path, shape.routed_experts, shape.topk - (1 if shape.fused_shared else 0), parsed.digest)


def make_routing(spec: str, M: int, E: int, topk: int, generator: torch.Generator,
                 device: torch.device | str, *, ep: int = 1, fused_shared: int = 0
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(topk_weights fp32 [M, topk], topk_ids int32 [M, topk])`` on ``device``, distinct experts per token.

    ``E`` and ``topk`` are what one GPU's kernel sees (``MoEShape``). Its ``E - fused_shared``
    routed experts are one GPU's share of ``(E - fused_shared) * ep``: with ``ep`` > 1 tokens pick
    top-k over all of them and a pick on another GPU becomes id -1 (not computed here), as vLLM's
    TP+EP layout runs it. Synthetic routings shuffle the experts' popularity over the GPUs (this
    GPU holds a random share); a captured file holds global ids and this GPU is the one the trace
    loads most (the layer waits for the busiest GPU). ``fused_shared`` > 0 (SGLang's shared-expert
    fusion): the last slot of every token goes to one of the shared experts after the routed
    ones (chosen at random among them, as SGLang does), with weight 1.

    Random numbers are drawn on the generator's device, so the result does not depend on ``device``.
    """
    parsed = parse_routing(spec)
    routed_here = E - fused_shared
    routed_topk = topk - (1 if fused_shared else 0)
    routed = routed_here * ep
    if M < 1 or ep < 1 or not 0 <= fused_shared < E or not 1 <= routed_topk <= routed:
        raise ValueError(f"routing needs M >= 1 and 1 <= routed top-k <= routed experts, got M={M}, E={E}, "
                         f"topk={topk}, ep={ep}, fused_shared={fused_shared}")
    first = 0
    if parsed.kind == "file":
        captured = load_topk_ids(parsed.path, routed, routed_topk, parsed.digest)
        if ep > 1:
            per_gpu = torch.bincount(captured.reshape(-1) // routed_here, minlength=ep)
            first = int(per_gpu.argmax()) * routed_here
        rows = torch.randperm(captured.shape[0], generator=generator, device=generator.device)
        picked = rows[torch.arange(M, device=generator.device) % captured.shape[0]]
        ids = captured.to(generator.device)[picked]
        logits = _gumbel((M, routed_topk), generator)
    else:
        log_popularity = -parsed.alpha * torch.log(torch.arange(1, routed + 1, dtype=torch.float32,
                                                                device=generator.device))
        if ep > 1:
            log_popularity = log_popularity[torch.randperm(routed, generator=generator, device=generator.device)]
        logits, ids = (log_popularity + _gumbel((M, routed), generator)).topk(routed_topk, dim=-1)
    weights = torch.softmax(logits, dim=-1)
    if ep > 1:
        local = (ids >= first) & (ids < first + routed_here)
        ids = torch.where(local, ids - first, torch.full_like(ids, -1))
    if fused_shared:
        shared = routed_here + torch.randint(fused_shared, (M, 1), generator=generator, device=generator.device)
        ids = torch.cat([ids, shared.to(ids.dtype)], dim=1)
        weights = torch.cat([weights, torch.ones((M, 1), device=weights.device)], dim=1)
    return weights.to(device), ids.to(device=device, dtype=torch.int32)


def _gumbel(size: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    uniform = torch.rand(size, generator=generator, device=generator.device)
    return -torch.log(-torch.log(uniform.clamp_min(torch.finfo(torch.float32).tiny)))


def _load_failure(suffix: str, exc: Exception) -> str:
    """Why ``torch.load``/``np.load`` refused a routing file, in one line: their messages run over
    several lines, carry terminal escapes and suggest loading the file unsafely, which a routing
    file never is (no pickled code runs: ``weights_only``, ``allow_pickle=False``)."""
    what = "not a NumPy .npy array of integers" if suffix == ".npy" else "not a torch.save file of one integer tensor"
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).strip()
    first = text.splitlines()[0] if text else ""
    detail = f"{type(exc).__name__}: {first.split('. ')[0].rstrip('.')}" if first else type(exc).__name__
    return f"{what}; pickled objects in it are never loaded ({detail})"


def load_topk_ids(path: str, E: int, topk: int, digest: str | None = None) -> torch.Tensor:
    """Captured ``topk_ids`` as int64 ``[rows, topk]`` on the CPU, checked against ``E`` and
    ``topk``; ValueError naming the file. ``digest`` (a pinned spec's): the bytes loaded are the
    bytes checked against it, RoutingFileChanged when they differ."""
    file = Path(path)
    if not file.is_file():
        raise ValueError(f"routing file {path} does not exist")
    content = _read_pinned(file, digest)
    try:
        if file.suffix == ".npy":
            loaded = torch.from_numpy(np.load(io.BytesIO(content), allow_pickle=False))
        else:
            loaded = torch.load(io.BytesIO(content), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the user's input error
        raise ValueError(f"routing file {path} is unreadable: {_load_failure(file.suffix, exc)}") from None
    if not isinstance(loaded, torch.Tensor):
        raise ValueError(f"routing file {path} must hold one tensor of topk_ids, got {type(loaded).__name__}")
    if loaded.dtype.is_floating_point or loaded.dtype.is_complex or loaded.dtype == torch.bool:
        raise ValueError(f"routing file {path}: topk_ids must be integers, got {loaded.dtype}")
    if loaded.dim() != 2 or loaded.shape[0] == 0 or loaded.shape[1] != topk:
        raise ValueError(f"routing file {path}: expected topk_ids [rows, {topk}], got {list(loaded.shape)}")
    ids = loaded.long()
    if ids.min() < 0 or ids.max() >= E:
        raise ValueError(f"routing file {path}: expert ids must be in [0, {E}), found {ids.min()}..{ids.max()}")
    ordered = ids.sort(dim=1).values
    if (ordered[:, 1:] == ordered[:, :-1]).any():
        raise ValueError(f"routing file {path}: a token lists the same expert twice")
    return ids
