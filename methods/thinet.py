"""``thinet``: ThiNet channel selection with least-squares reconstruction.

Luo, Wu & Lin, "ThiNet: A Filter Level Pruning Method for Deep Neural Network Compression", ICCV 2017
(arXiv:1707.06342). Whether channel ``c`` of layer ``l`` may go is decided by the *next* layer: sample
points of the consumer's output, write each sampled output value as a sum of per-in-channel terms

    y = sum_c x_c,    x_c = sum_{kh,kw} W^{l+1}[o, c, kh, kw] * patch[c, kh, kw]   (bias left out)

and greedily grow the removal set T that keeps ``sum_i (sum_{c in T} x_{i,c})^2`` smallest (the paper's
Algorithm 1), then rescale the kept in-channels of the consumer by ``w = argmin ||y - X_kept w||^2``
(the paper's Eq. 7). No sparsity training: the harness gives the method plain training of the same
length. Every group loses the same fraction of its channels (it defines ``select``, which makes it a calibrated method), chosen by the engine so
that the network meets the MACs target; the paper also prunes a fixed ratio per layer.

Choices the paper leaves open, and ours:

* **Sampling** -- ``samples_per_image`` random (output position, output channel) pairs per calibration
  image (the paper: 10 locations per image), drawn uniformly, at most ``max_rows`` rows per consumer (the
  rows are spread over the batches in proportion to their size). ``seed`` fixes the draw; otherwise
  torch's global generator is used, which the harness seeds per cell.
* **One-shot, one pass** -- the paper prunes layer by layer and fine-tunes between layers. We collect the
  statistics of every group in a single forward pass over the calibration batches of the *dense* model,
  the first time :meth:`ThiNet.select` is called after :meth:`~PruningMethod.attach`, and select every
  group from them; the shared fine-tuning follows the whole cut. This is also what keeps one group's
  reconstruction from changing the statistics of the next.
* **Consumer** -- a group with several conv/linear consumers (e.g. an input fed to two branches) is
  judged by its first convolution (its first linear layer if it has none); the other consumers simply
  lose the same in-channels. A linear consumer treats every input feature as a 1x1 location; where a
  flatten maps one channel onto several features, that channel's term is the sum over its features.
  Grouped/depthwise consumers are not handled: :meth:`ThiNet.select` returns ``None`` and the engine
  falls back on :meth:`ThiNet.score`.
* **Reconstruction** -- only the group's own in-channels enter the regression (the consumer's other
  in-channels, e.g. in a concatenation, are unchanged, so they cancel). We solve for a correction
  ``w = 1 + d`` with a tiny ridge penalty on ``d`` (via ``torch.linalg.lstsq`` on the augmented system,
  in float64) so that near-collinear or dead channels keep their scale instead of blowing up; any
  non-finite result falls back to ``w = 1``.
* **Fallback score** -- :meth:`ThiNet.score` (used only when :meth:`ThiNet.select` cannot run) is the
  root filter's L1 norm: a calibration-free importance, as in the ``l1`` control.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from prunebench.groups import GroupMember, PrunableGroup
from prunebench.method import Calibration, MethodParams, PruningMethod
from prunebench.registry import register_method

_RIDGE = 1e-6  # ridge on the deviation from w = 1, relative to the mean squared column norm


class ThiNetParams(MethodParams):
    """Sampling and reconstruction settings of :class:`ThiNet`."""

    samples_per_image: int = Field(10, ge=1, description="random output points sampled per calibration image")
    max_rows: int = Field(4096, ge=1, description="cap on sampled points per consumer layer")
    reconstruct: bool = Field(True, description="rescale kept in-channels of the consumer by least squares")
    seed: int | None = Field(None, description="sampling seed; None uses torch's global generator")


@register_method("thinet")
class ThiNet(PruningMethod[ThiNetParams]):
    description = "ThiNet (Luo et al. 2017): greedy next-layer reconstruction + least-squares rescaling"

    def __init__(self, params: ThiNetParams | None = None) -> None:
        super().__init__(params)
        self._stats: dict[PrunableGroup, Tensor | None] = {}
        self._stats_for: tuple[nn.Module, list[Tensor]] | None = None

    def attach(self, model: nn.Module, groups: Sequence[PrunableGroup]) -> None:
        """Also forgets the cached statistics: after a cut the model and the groups are new."""
        super().attach(model, groups)
        self._stats.clear()
        self._stats_for = None

    def score(self, group: PrunableGroup) -> Tensor:
        """Fallback importance: the L1 norm of the root layer's filter of each channel."""
        w = group.root.weight.detach()
        root = next((m for m in group.part("out") if m.module is group.root), None)
        if root is not None:
            w = w.index_select(0, root.idxs[:, 0].to(w.device))
        return w.abs().flatten(1).sum(1)

    def select(self, group: PrunableGroup, n_remove: int, calib: Calibration) -> Tensor | None:
        """Greedy removal set from the consumer's sampled output terms, then least-squares rescaling."""
        if not 0 <= n_remove <= group.size:
            raise ValueError(f"n_remove={n_remove} outside [0, {group.size}] for group {group.name!r}")
        X = self._group_stats(group, calib)
        if X is None:
            return None
        X = X.to("cpu", torch.float64)  # small ([rows, size]); float64 keeps the greedy sums exact enough
        remove = greedy_removal(X, n_remove)
        if self.params.reconstruct and 0 < n_remove < group.size:
            keep = _complement(remove, group.size)
            consumer = _judged_consumer(group)
            assert consumer is not None  # X exists only for a supported consumer
            rescale_in_channels(consumer, keep, least_squares_scale(X, keep))
        return remove.cpu()

    # -- statistics --------------------------------------------------------------------------------
    def _group_stats(self, group: PrunableGroup, calib: Calibration) -> Tensor | None:
        """Sampled terms ``[rows, group.size]`` for ``group``, collected for all groups in one pass."""
        seen = self._stats_for
        if seen is None or seen[0] is not calib.model or seen[1] is not calib.batches:
            self._stats.clear()
            self._stats_for = (calib.model, calib.batches)
        if group not in self._stats:
            todo = [g for g in dict.fromkeys([*self.groups, group]) if g not in self._stats]
            self._stats.update(collect_terms(todo, calib, self.params, _generator(self.params.seed)))
        return self._stats[group]


def _generator(seed: int | None) -> torch.Generator | None:
    return None if seed is None else torch.Generator().manual_seed(seed)


def _complement(idx: Tensor, size: int) -> Tensor:
    mask = torch.ones(size, dtype=torch.bool, device=idx.device)
    mask[idx] = False
    return mask.nonzero().squeeze(1)


def _judged_consumer(group: PrunableGroup) -> GroupMember | None:
    """The consumer whose output decides the group: the first conv, else the first linear layer."""
    cons = group.consumers()
    return next((m for m in cons if isinstance(m.module, nn.Conv2d)), cons[0] if cons else None)


def _supported(member: GroupMember | None) -> bool:
    return member is not None and getattr(member.module, "groups", 1) == 1


# -- sampling ----------------------------------------------------------------------------------------
@contextmanager
def record_inputs(modules: Sequence[nn.Module], fn: Callable[[nn.Module, Tensor], None]) -> Iterator[None]:
    """Call ``fn(module, input)`` on every forward of ``modules``; the hooks are always removed."""
    handles = [m.register_forward_hook(lambda mod, inp, out: fn(mod, inp[0].detach())) for m in modules]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def row_quota(batch_sizes: Sequence[int], per_image: int, max_rows: int) -> list[int]:
    """Rows to sample from each batch: ``per_image`` per image, scaled down to ``max_rows`` in total."""
    total = sum(batch_sizes) * per_image
    if total <= max_rows:
        return [n * per_image for n in batch_sizes]
    cum = torch.tensor([0, *batch_sizes]).cumsum(0) * per_image
    bounds = (cum * max_rows) // total  # cumulative rounding keeps the sum exactly max_rows
    return (bounds[1:] - bounds[:-1]).tolist()


def _sample_images(n_images: int, per_image: int, rows: int, gen: torch.Generator | None) -> Tensor:
    """Image index of each sampled row: ``per_image`` slots per image, ``rows`` of them without replacement."""
    slots = torch.arange(n_images * per_image)
    if rows < slots.numel():
        slots = slots[torch.randperm(slots.numel(), generator=gen)[:rows]]
    return slots // per_image


def conv_terms(conv: nn.Conv2d, x: Tensor, img: Tensor, gen: torch.Generator | None) -> Tensor:
    """Per-in-channel terms ``[rows, c_in]`` of ``conv``'s output at random points of images ``img``.

    Each row is one (image, output position, output channel o); entry c is
    ``sum_{kh,kw} W[o, c, kh, kw] * patch[c, kh, kw]``, gathered only at the sampled points.
    """
    mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
    xp = F.pad(x, conv._reversed_padding_repeated_twice, mode=mode)
    (kh, kw), (sh, sw), (dh, dw) = conv.kernel_size, conv.stride, conv.dilation
    h_out = (xp.shape[2] - dh * (kh - 1) - 1) // sh + 1
    w_out = (xp.shape[3] - dw * (kw - 1) - 1) // sw + 1
    rows = img.numel()
    oy = torch.randint(h_out, (rows,), generator=gen).to(x.device)
    ox = torch.randint(w_out, (rows,), generator=gen).to(x.device)
    o = torch.randint(conv.out_channels, (rows,), generator=gen).to(x.device)
    ry = oy[:, None, None] * sh + (torch.arange(kh, device=x.device) * dh)[None, :, None]
    rx = ox[:, None, None] * sw + (torch.arange(kw, device=x.device) * dw)[None, None, :]
    patch = xp[img.to(x.device)[:, None, None], :, ry, rx]  # [rows, kh, kw, c_in]
    w = conv.weight.detach()[o]  # [rows, c_in, kh, kw]
    return torch.einsum("rhwc,rchw->rc", patch, w)


def linear_terms(lin: nn.Linear, x: Tensor, img: Tensor, gen: torch.Generator | None) -> Tensor:
    """Per-input-feature terms ``[rows, in_features]`` of ``lin``: each feature is a 1x1 location."""
    x = x.reshape(x.shape[0], -1, x.shape[-1])  # [N, positions, F]
    rows = img.numel()
    pos = torch.randint(x.shape[1], (rows,), generator=gen).to(x.device)
    o = torch.randint(lin.out_features, (rows,), generator=gen).to(x.device)
    return x[img.to(x.device), pos] * lin.weight.detach()[o]


def collect_terms(
    groups: Sequence[PrunableGroup], calib: Calibration, params: ThiNetParams, gen: torch.Generator | None
) -> dict[PrunableGroup, Tensor | None]:
    """One forward pass over the calibration batches; the sampled terms of every group, ``[rows, size]``.

    Groups whose consumer cannot be handled (none, or a grouped convolution) map to ``None``.
    """
    judged = {g: _judged_consumer(g) for g in groups}
    by_module: dict[nn.Module, list[Tensor]] = {}
    for m in judged.values():
        if _supported(m):
            by_module.setdefault(m.module, [])
    quota = row_quota([b.shape[0] for b in calib.batches], params.samples_per_image, params.max_rows)
    current: dict[str, int] = {}

    def on_input(module: nn.Module, x: Tensor) -> None:
        b = current["batch"]
        img = _sample_images(x.shape[0], params.samples_per_image, quota[b], gen)
        fn = conv_terms if isinstance(module, nn.Conv2d) else linear_terms
        by_module[module].append(fn(module, x, img, gen))

    model = calib.model
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), record_inputs(list(by_module), on_input):
            for b, batch in enumerate(calib.batches):
                current["batch"] = b
                model(batch)
    finally:
        model.train(was_training)

    out: dict[PrunableGroup, Tensor | None] = {}
    for g, m in judged.items():
        if not _supported(m) or not by_module[m.module]:
            out[g] = None
            continue
        terms = torch.cat(by_module[m.module])  # [rows, c_in]
        out[g] = terms[:, m.idxs.to(terms.device)].sum(-1)  # [rows, size]: a channel's features summed
    return out


# -- selection and reconstruction --------------------------------------------------------------------
def greedy_removal(X: Tensor, n_remove: int) -> Tensor:
    """ThiNet's Algorithm 1: grow the removal set T minimizing ``||sum_{c in T} X[:, c]||^2``.

    Each step scores every candidate at once: ``||acc + X_c||^2 = ||acc||^2 + 2 acc.X_c + ||X_c||^2``.
    """
    col_sq = X.pow(2).sum(0)
    acc = torch.zeros(X.shape[0], dtype=X.dtype, device=X.device)
    taken = torch.zeros(X.shape[1], dtype=torch.bool, device=X.device)
    order = []
    for _ in range(n_remove):  # one step per removed channel, vectorized over the candidates
        value = 2 * (acc @ X) + col_sq
        value = value.masked_fill(taken, float("inf"))
        c = int(value.argmin())
        taken[c] = True
        acc += X[:, c]
        order.append(c)
    return torch.tensor(order, dtype=torch.long)


def least_squares_scale(X: Tensor, keep: Tensor) -> Tensor:
    """Per-kept-channel scale ``w = argmin ||y - X_keep w||^2`` with ``y = X.sum(1)`` (ThiNet Eq. 7).

    Solved as ``w = 1 + d`` with a tiny ridge on ``d``, which leaves well-posed problems unchanged and
    keeps dead or collinear channels at scale 1; non-finite solutions fall back to ``w = 1``.
    """
    X = X.detach().to("cpu", torch.float64)
    A = X[:, keep.cpu()]
    r = X.sum(1) - A.sum(1)  # what the removed channels contributed
    k = A.shape[1]
    lam = _RIDGE * float(A.pow(2).sum()) / max(k, 1) + 1e-30
    A_aug = torch.cat([A, lam**0.5 * torch.eye(k, dtype=A.dtype)])
    r_aug = torch.cat([r, torch.zeros(k, dtype=r.dtype)])
    try:
        d = torch.linalg.lstsq(A_aug, r_aug[:, None]).solution[:, 0]
    except RuntimeError:
        return torch.ones(k)
    w = 1 + d
    return w.float() if torch.isfinite(w).all() else torch.ones(k)


def rescale_in_channels(member: GroupMember, keep: Tensor, scale: Tensor) -> None:
    """Multiply the consumer's in-channel weights of the kept group channels by ``scale``."""
    w = member.module.weight
    cols = member.idxs[keep.to(member.idxs.device)].reshape(-1).to(w.device)
    s = scale.to(w.device, w.dtype).repeat_interleave(member.idxs.shape[1])
    with torch.no_grad():
        w[:, cols] *= s.view(1, -1, *([1] * (w.dim() - 2)))
