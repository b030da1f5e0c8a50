"""``thinet``: ThiNet channel selection with least-squares reconstruction.

Luo, Wu & Lin, "ThiNet: A Filter Level Pruning Method for Deep Neural Network Compression", ICCV 2017
(arXiv:1707.06342). Whether channel ``c`` of layer ``l`` may go is decided by the *next* layer: sample
points of the consumer's output, write each sampled output value as a sum of per-in-channel terms

    y = sum_c x_c,    x_c = sum_{kh,kw} W^{l+1}[o, c, kh, kw] * patch[c, kh, kw]   (bias left out)

and greedily grow the removal set T that keeps ``sum_i (sum_{c in T} x_{i,c})^2`` smallest (the paper's
Algorithm 1), then rescale the kept in-channels of the consumer by ``w = argmin ||y - X_kept w||^2``
(the paper's Eq. 7). No sparsity training: the harness gives the method plain training of the same
length. Every group loses the same fraction of its channels (it defines ``select``, which makes it a
calibrated method), chosen by the engine so that the network meets the MACs target; the paper also prunes
a fixed ratio per layer.

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
  judged by the ungrouped convolution that spends the most multiply-adds on a channel (output positions x
  out-channels x kernel area; the first one of equals), or its first linear layer if it has no
  convolution: the main path, not a squeeze-excitation gate's convolution on the pooled 1x1 input; the
  other consumers simply lose the same in-channels. A linear consumer treats
  every input feature as a 1x1 location; where a flatten maps one channel onto several features, that
  channel's term is the sum over its features. Grouped/depthwise consumers are not handled:
  :meth:`ThiNet.select` returns ``None`` and the engine falls back on :meth:`ThiNet.score`.
* **Padding** -- the terms are gathered from the input padded as the consumer's own ``forward`` pads it:
  static ``padding`` with any ``padding_mode``, torch's ``"same"``, and timm's dynamic TF-style "same"
  padding (``Conv2dSame`` of the ``tf_*`` models and friends, computed from the input size and
  asymmetric) through timm's own helper; the children of timm's ``MixedConv2d`` are ordinary consumers.
  Every consumer's sampled terms are checked against its output at the same points: a layer whose terms
  do not sum to its output (a padding or a weight transform such as weight standardization that is not
  reproduced) is not used -- one warning, and its groups fall back on :meth:`ThiNet.score`.
* **Reconstruction** -- only the group's own in-channels enter the regression (the consumer's other
  in-channels, e.g. in a concatenation, are unchanged, so they cancel). We solve for a correction
  ``w = 1 + d`` with a tiny ridge penalty on ``d`` (via ``torch.linalg.lstsq`` on the augmented system,
  in float64) so that near-collinear or dead channels keep their scale instead of blowing up; any
  non-finite result falls back to ``w = 1``.
* **Fallback score** -- :meth:`ThiNet.score` (used only when :meth:`ThiNet.select` cannot run) is the
  root filter's L1 norm: a calibration-free importance, as in the ``l1`` control.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from pydantic import Field
from timm.layers import Conv2dSame, pad_same
from timm.layers.conv2d_same import Conv2dSameExport
from torch import Tensor, nn

from prunebench.groups import GroupMember, PrunableGroup
from prunebench.method import Calibration, MethodParams, PruningMethod
from prunebench.registry import register_method

log = logging.getLogger(__name__)

_RIDGE = 1e-6  # ridge on the deviation from w = 1, relative to the mean squared column norm
# Largest relative distance between the sampled terms' sums and the consumer's own output for the terms to
# be used: float32 and TF32 rounding stay near 1e-3, a wrong padding or weight is off by tens of percent.
_FAITHFUL = 2e-2


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
        self._stats: dict[PrunableGroup, Judged | None] = {}
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
        judged = self._group_stats(group, calib)
        if judged is None:
            return None
        X = judged.terms.to("cpu", torch.float64)  # small ([rows, size]); float64 keeps the greedy sums exact enough
        remove = greedy_removal(X, n_remove)
        if self.params.reconstruct and 0 < n_remove < group.size:
            keep = _complement(remove, group.size)
            rescale_in_channels(judged.consumer, keep, least_squares_scale(X, keep))
        return remove.cpu()

    # -- statistics --------------------------------------------------------------------------------
    def _group_stats(self, group: PrunableGroup, calib: Calibration) -> Judged | None:
        """``group``'s judged consumer and sampled terms ``[rows, group.size]``, collected for all groups
        in one pass."""
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


def _candidates(group: PrunableGroup) -> list[GroupMember]:
    """The consumers ThiNet may judge ``group`` by: its ungrouped convolutions; without any convolution,
    its first linear layer. Grouped and depthwise convolutions are not handled."""
    cons = group.consumers()
    convs = [m for m in cons if isinstance(m.module, nn.Conv2d)]
    if convs:
        return [m for m in convs if m.module.groups == 1]
    return cons[:1]


@dataclass(eq=False)
class Judged:
    """The consumer a group is judged by and its sampled terms ``[rows, group.size]``."""

    consumer: GroupMember
    terms: Tensor


# -- sampling ----------------------------------------------------------------------------------------
@contextmanager
def record_calls(modules: Sequence[nn.Module], fn: Callable[[nn.Module, Tensor, Tensor], None]) -> Iterator[None]:
    """Call ``fn(module, input, output)`` on every forward of ``modules``; the hooks are always removed."""
    handles = [m.register_forward_hook(lambda mod, inp, out: fn(mod, inp[0].detach(), out.detach())) for m in modules]
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


def padded_input(conv: nn.Conv2d, x: Tensor) -> Tensor:
    """``x`` padded exactly as ``conv``'s forward pads it before an unpadded convolution.

    * timm's dynamic TF-style "same" padding, computed from the input size inside ``forward``
      (asymmetric: the extra row/column goes right/bottom): ``Conv2dSame`` and the weight-standardized
      ``*Same`` convs (``same_pad``) through timm's own ``pad_same``; ``Conv2dSameExport`` through the
      ``ZeroPad2d`` its forward builds;
    * everything else as ``nn.Conv2d`` pads: the static ``padding`` (ints, tuples, ``"same"`` with its
      asymmetric split for even kernels, ``"valid"``) with ``padding_mode`` (zeros, reflect, replicate,
      circular).

    Conv subclasses with their own ``forward`` that pad otherwise are caught by the comparison with the
    module's output in :func:`collect_terms`.
    """
    if isinstance(conv, Conv2dSameExport) and isinstance(conv.pad, nn.Module):
        return conv.pad(x)  # built by the forward that just ran, for this input size
    if isinstance(conv, Conv2dSame):
        return pad_same(x, conv.kernel_size, conv.stride, conv.dilation)  # forward ignores self.padding
    if getattr(conv, "same_pad", False) is True:
        x = pad_same(x, conv.kernel_size, conv.stride, conv.dilation)
    mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
    return F.pad(x, conv._reversed_padding_repeated_twice, mode=mode)


def conv_terms(
    conv: nn.Conv2d, x: Tensor, y: Tensor, img: Tensor, gen: torch.Generator | None
) -> tuple[Tensor, Tensor] | None:
    """Per-in-channel terms ``[rows, c_in]`` of ``conv``'s output ``y`` at random points of images ``img``,
    and ``y`` itself at those points, less the bias (what the terms must sum to).

    Each row is one (image, output position, output channel o); entry c is
    ``sum_{kh,kw} W[o, c, kh, kw] * patch[c, kh, kw]``, gathered only at the sampled points of the input
    padded as the module pads it (:func:`padded_input`). ``None`` when that padded input does not give
    ``y``'s output grid (a padding this function does not know).
    """
    xp = padded_input(conv, x)
    (kh, kw), (sh, sw), (dh, dw) = conv.kernel_size, conv.stride, conv.dilation
    h_out, w_out = y.shape[-2:]
    if (xp.shape[2] - dh * (kh - 1) - 1) // sh + 1 != h_out or (xp.shape[3] - dw * (kw - 1) - 1) // sw + 1 != w_out:
        return None
    rows = img.numel()
    oy = torch.randint(h_out, (rows,), generator=gen).to(x.device)
    ox = torch.randint(w_out, (rows,), generator=gen).to(x.device)
    o = torch.randint(conv.out_channels, (rows,), generator=gen).to(x.device)
    img = img.to(x.device)
    ry = oy[:, None, None] * sh + (torch.arange(kh, device=x.device) * dh)[None, :, None]
    rx = ox[:, None, None] * sw + (torch.arange(kw, device=x.device) * dw)[None, None, :]
    patch = xp[img[:, None, None], :, ry, rx]  # [rows, kh, kw, c_in]
    w = conv.weight.detach()[o]  # [rows, c_in, kh, kw]
    terms = torch.einsum("rhwc,rchw->rc", patch, w)
    return terms, _less_bias(y[img, o, oy, ox], conv, o).to(terms.dtype)


def linear_terms(
    lin: nn.Linear, x: Tensor, y: Tensor, img: Tensor, gen: torch.Generator | None
) -> tuple[Tensor, Tensor]:
    """Per-input-feature terms ``[rows, in_features]`` of ``lin`` (each feature a 1x1 location) and its
    output at the sampled points, less the bias."""
    x = x.reshape(x.shape[0], -1, x.shape[-1])  # [N, positions, F]
    y = y.reshape(y.shape[0], -1, y.shape[-1])
    rows = img.numel()
    pos = torch.randint(x.shape[1], (rows,), generator=gen).to(x.device)
    o = torch.randint(lin.out_features, (rows,), generator=gen).to(x.device)
    img = img.to(x.device)
    terms = x[img, pos] * lin.weight.detach()[o]
    return terms, _less_bias(y[img, pos, o], lin, o).to(terms.dtype)


def _work(module: nn.Module, y: Tensor) -> int:
    """Multiply-adds per image that one in-channel costs ``module``: output positions x out-channels x
    kernel area for a convolution, out-features x positions for a linear layer."""
    if isinstance(module, nn.Conv2d):
        kh, kw = module.kernel_size
        return y.shape[-2] * y.shape[-1] * module.out_channels * kh * kw // module.groups
    return y[0].numel()


def _less_bias(y: Tensor, module: nn.Module, o: Tensor) -> Tensor:
    bias = getattr(module, "bias", None)
    return y if bias is None else y - bias.detach()[o].to(y.dtype)


@dataclass
class _Sampled:
    """What the calibration pass gathered for one consumer module."""

    terms: list[Tensor] = field(default_factory=list)
    work: int = 0  # multiply-adds per image and in-channel (see _work)
    err_sq: float = 0.0  # squared distance between the terms' sums and the module's own output
    ref_sq: float = 0.0
    unknown: bool = False  # a padding conv_terms could not reproduce

    def faithful(self) -> bool:
        return not self.unknown and self.err_sq <= _FAITHFUL**2 * self.ref_sq


def collect_terms(
    groups: Sequence[PrunableGroup], calib: Calibration, params: ThiNetParams, gen: torch.Generator | None
) -> dict[PrunableGroup, Judged | None]:
    """One forward pass over the calibration batches; every group's judged consumer and sampled terms.

    A group is judged by the candidate consumer (:func:`_candidates`) that spends the most multiply-adds
    on each of its channels (:func:`_work`), the first one of equals: the main path rather than a channel
    gate's convolution on a pooled 1x1 input (squeeze-excitation). The sampled terms of every consumer
    are checked against the module's own output at the same points: where they do not sum to it (a
    padding or a weight transform in the module's ``forward`` not reproduced here, such as weight
    standardization), the consumer is not used, one warning says so, and the group maps to ``None`` like
    one with no usable consumer (the engine then falls back on :meth:`ThiNet.score`).
    """
    candidates = {g: _candidates(g) for g in groups}
    seen: dict[nn.Module, _Sampled] = {m.module: _Sampled() for cand in candidates.values() for m in cand}
    quota = row_quota([b.shape[0] for b in calib.batches], params.samples_per_image, params.max_rows)
    current: dict[str, int] = {}

    def on_call(module: nn.Module, x: Tensor, y: Tensor) -> None:
        rec = seen[module]
        if rec.unknown:
            return
        is_conv = isinstance(module, nn.Conv2d)
        rec.work = max(rec.work, _work(module, y))
        img = _sample_images(x.shape[0], params.samples_per_image, quota[current["batch"]], gen)
        got = conv_terms(module, x, y, img, gen) if is_conv else linear_terms(module, x, y, img, gen)
        if got is None:
            rec.unknown = True
            return
        terms, target = got
        rec.err_sq += float((terms.sum(1) - target).double().pow(2).sum())
        rec.ref_sq += max(float(target.double().pow(2).sum()), float(terms.sum(1).double().pow(2).sum()))
        rec.terms.append(terms)

    model = calib.model
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), record_calls(list(seen), on_call):
            for b, batch in enumerate(calib.batches):
                current["batch"] = b
                model(batch)
    finally:
        model.train(was_training)

    _warn_unfaithful(model, seen)
    out: dict[PrunableGroup, Judged | None] = {}
    for g, cand in candidates.items():
        used = [m for m in cand if seen[m.module].terms or seen[m.module].unknown]
        best = max(used, key=lambda m: seen[m.module].work, default=None)  # the first of equals
        if best is None or not seen[best.module].faithful():
            out[g] = None
            continue
        terms = torch.cat(seen[best.module].terms)  # [rows, c_in]
        out[g] = Judged(best, terms[:, best.idxs.to(terms.device)].sum(-1))  # a channel's features summed
    return out


def _warn_unfaithful(model: nn.Module, seen: dict[nn.Module, _Sampled]) -> None:
    names = {m: n for n, m in model.named_modules()}
    bad = [
        f"{names.get(m, '?')} ({type(m).__name__})"
        for m, rec in seen.items()
        if (rec.terms or rec.unknown) and not rec.faithful()
    ]
    if bad:
        log.warning(
            "thinet: the sampled terms of %d layer(s) do not reproduce their output (%s%s); the groups they "
            "consume are scored by the filter L1 fallback",
            len(bad),
            ", ".join(bad[:3]),
            ", ..." if len(bad) > 3 else "",
        )


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
