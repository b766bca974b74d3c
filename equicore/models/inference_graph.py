"""An inference-optimised copy of a model for attacks and defenses (``model.graph: optimized`` in a run config).

:func:`optimize_for_inference` returns a deep copy of an eval-mode model in which every eval-mode BatchNorm that
directly follows a convolution is folded into it (``conv'(x) = bn(conv(x))`` with the running statistics, the
weights computed by ``torch.nn.utils.fusion.fuse_conv_bn_weights``), and the BatchNorm is replaced by
``nn.Identity`` *in place* in the module hierarchy: every module keeps its name, so the forward hooks of the task
adapters (``feature_layer: features.block2``, ``base.4``, ``backbone.body.layer2``) attach to the same names and
see the same (folded) values. The copy computes the same function up to float rounding; the measured effect on the
shipped models is in the README ("Inference graph"), and ``tests/test_inference_graph.py`` bounds it per model.

How pairs are found. A conv/BN pair is folded only when the BN's input is the conv's output and nothing else uses
that output: the module is traced with ``torch.fx`` and a BN call whose only argument is a conv call with no other
user is a pair. A module fx cannot trace (data-dependent control flow: the input checks of ``Normalize``, Mask
R-CNN's transform) is not traced as a whole: its children are, one by one, and an ``nn.Sequential`` that cannot be
traced still folds a conv immediately followed by a BN among its own children (in a Sequential the conv's output
goes only to the next module). Nothing fails: a model where no pair is found comes back as an unchanged copy.

Left unfolded, to keep the function and the hooks exact: a conv whose name is in ``keep`` (a hooked feature layer
must still see the conv's own output, not the BN's), a conv or BN with hooks of its own, a module registered
under two names or called twice in a traced graph, a BN in training mode or without running statistics, a
transposed convolution. In-place activations are not introduced: an in-place ReLU after a hooked layer would
overwrite the captured feature tensor.

``channels_last`` converts the copy's 4-D weights to NHWC (the activations follow from the first convolution).
Measured on the README benchmarks' 2-core CPU, shared (load 1-2), torch 2.14.1, one thread, forward + backward
w.r.t. the input (what attacks and defenses run), median of 7, in ms, plain / folded / folded + NHWC:

    drn_tiny_seg      4 x 3 x 96 x 96 (logits_lowres)   119.3 / 110.8 /  96.9   (NHWC without folding: 124.6)
    drn_tiny_seg     20 x 3 x 96 x 96                   590.1 / 533.8 / 365.7
    fashion_cnn      16 x 1 x 28 x 28                    72.1 /  55.0 /  44.2   (NHWC without folding: 57.4)
    fashion_cnn      64 x 1 x 28 x 28                   263.9 / 220.9 / 154.9
    lenet5_mnist_adv 16 x 1 x 28 x 28 (no BatchNorm)     16.4 /  16.0 /  11.2
    maskrcnn_small    4 x 3 x 96 x 96 (FPN features)     37.6 /  35.4 /  29.1

NHWC helps every shipped model once BatchNorm is folded, so ``model.graph: optimized`` (:func:`build_graph`) is
both; over a whole equivariance ``purify`` the two give 1.25-1.3x (``python -m bench.defense_efficiency``). Not
done, by measurement or for safety: in-place activations (a forward hook's captured tensor would be overwritten,
and ReLU forward + backward, ~9% of a purify step, would still run: only an output allocation goes), and moving the
stride-1 1x1 convolutions off PyTorch's slow (non-oneDNN) path (~2% of a purify step in a profile of the optimized
``drn_tiny_seg``).
"""

from __future__ import annotations

import copy
import warnings
from collections import Counter
from dataclasses import dataclass

import torch
from torch import fx, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd
from torch.nn.utils.fusion import fuse_conv_bn_weights

from equicore.errors import InvalidInputError

try:  # torchvision's BatchNorm with frozen statistics (its detection and segmentation backbones may use it)
    from torchvision.ops.misc import FrozenBatchNorm2d
except ImportError:  # pragma: no cover
    FrozenBatchNorm2d = None  # type: ignore[assignment,misc]

GRAPHS = ("plain", "optimized")  # the values of a run config's model.graph
_NORMS: tuple[type[nn.Module], ...] = (_BatchNorm,) + ((FrozenBatchNorm2d,) if FrozenBatchNorm2d is not None else ())


@dataclass(frozen=True)
class FoldedPair:
    """A convolution and the BatchNorm folded into it, by their names in the model."""

    conv: str
    norm: str


def _has_hooks(module: nn.Module) -> bool:
    return bool(
        module._forward_hooks or module._forward_pre_hooks or module._backward_hooks or module._backward_pre_hooks
    )


def _foldable(conv: nn.Module, norm: nn.Module) -> bool:
    """An eval-mode normalisation with running statistics right after a plain (not transposed) convolution."""
    if not isinstance(conv, _ConvNd) or conv.transposed or not isinstance(norm, _NORMS):
        return False
    if isinstance(norm, _BatchNorm):
        if norm.training or norm.running_mean is None or norm.running_var is None:
            return False
        if norm.num_features != conv.out_channels or norm.running_mean.ndim != 1:
            return False
        dims = {nn.Conv1d: (nn.BatchNorm1d,), nn.Conv2d: (nn.BatchNorm2d,), nn.Conv3d: (nn.BatchNorm3d,)}
        expected = next((bn for c, bn in dims.items() if isinstance(conv, c)), ())
        if not isinstance(norm, expected):
            return False
    elif not isinstance(conv, nn.Conv2d) or norm.running_mean.shape[0] != conv.out_channels:
        return False
    return not (_has_hooks(conv) or _has_hooks(norm))


class _PairTracer(fx.Tracer):
    """Convolutions, normalisations, torch.nn layers and any module without a convolution or normalisation inside
    (input normalisation with its shape checks, say) are leaves: their insides cannot hold a pair."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if isinstance(m, (_ConvNd, *_NORMS)) or super().is_leaf_module(m, module_qualified_name):
            return True
        return not any(isinstance(s, (_ConvNd, *_NORMS)) for s in m.modules())


def _trace(module: nn.Module) -> fx.Graph | None:
    """The fx graph of ``module.forward`` (see :class:`_PairTracer` for its leaves), or None when it cannot be
    traced."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return _PairTracer().trace(module)
    except Exception:  # noqa: BLE001  (fx raises many exception types on data-dependent Python)
        return None


def _pairs_in_graph(graph: fx.Graph, module: nn.Module, prefix: str) -> list[tuple[str, str]]:
    modules = dict(module.named_modules())
    calls = Counter(n.target for n in graph.nodes if n.op == "call_module")
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or len(node.args) != 1 or node.kwargs:
            continue
        src = node.args[0]
        if not isinstance(src, fx.Node) or src.op != "call_module" or len(src.users) != 1:
            continue
        if calls[node.target] != 1 or calls[src.target] != 1:
            continue
        if _foldable(modules[str(src.target)], modules[str(node.target)]):
            pairs.append((prefix + str(src.target), prefix + str(node.target)))
    return pairs


def _pairs_in(module: nn.Module, prefix: str) -> list[tuple[str, str]]:
    """Conv/BN pairs of ``module`` by tracing it, else by Sequential adjacency and its children's own pairs."""
    if isinstance(module, torch.jit.ScriptModule):
        return []  # compiled: its submodules cannot be replaced
    graph = _trace(module)
    if graph is not None:
        return _pairs_in_graph(graph, module, prefix)
    pairs: list[tuple[str, str]] = []
    if isinstance(module, nn.Sequential):
        children = list(module.named_children())
        for (conv_name, conv), (norm_name, norm) in zip(children, children[1:], strict=False):
            if _foldable(conv, norm):
                pairs.append((prefix + conv_name, prefix + norm_name))
    for name, child in module.named_children():
        pairs += _pairs_in(child, f"{prefix}{name}.")
    return pairs


def foldable_pairs(model: nn.Module, keep: tuple[str, ...] = ()) -> list[FoldedPair]:
    """The conv/BN pairs of ``model`` that :func:`optimize_for_inference` folds (names in ``keep`` excluded).

    Traces a throwaway copy: a forward run on fx proxies can leave state behind in the modules it ran (torchvision's
    ``MultiScaleRoIAlign`` caches its scales on first call, and a failed trace caches proxies there)."""
    registered = Counter(id(m) for _, m in model.named_modules(remove_duplicate=False))
    modules = dict(model.named_modules())
    out: list[FoldedPair] = []
    seen: set[str] = set()
    for conv, norm in _pairs_in(copy.deepcopy(model), ""):
        if conv in keep or conv in seen or norm in seen:
            continue
        if registered[id(modules[conv])] != 1 or registered[id(modules[norm])] != 1:
            continue  # shared modules: another call site may use the conv's output without the BN
        seen.update((conv, norm))
        out.append(FoldedPair(conv, norm))
    return out


def _fused(conv: _ConvNd, norm: nn.Module) -> _ConvNd:
    fused = copy.deepcopy(conv)
    fused.weight, fused.bias = fuse_conv_bn_weights(
        conv.weight, conv.bias, norm.running_mean, norm.running_var, norm.eps, norm.weight, norm.bias
    )
    return fused


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, attr, new)


def optimize_for_inference(
    model: nn.Module, *, channels_last: bool = False, keep: tuple[str, ...] = ()
) -> tuple[nn.Module, list[FoldedPair]]:
    """A deep copy of eval-mode ``model`` with its conv/BN pairs folded (BN -> ``nn.Identity`` under its own name),
    optionally with NHWC weights; and the pairs it folded. ``keep``: module names whose own output must stay
    exactly as it is (hooked feature layers): a conv named there keeps its BN. ``model`` is not modified."""
    out = copy.deepcopy(model)
    pairs = foldable_pairs(out, keep)
    with torch.no_grad():
        for pair in pairs:
            conv, norm = out.get_submodule(pair.conv), out.get_submodule(pair.norm)
            _replace(out, pair.conv, _fused(conv, norm))  # type: ignore[arg-type]
            _replace(out, pair.norm, nn.Identity())
    if channels_last:
        out = out.to(memory_format=torch.channels_last)
    return out, pairs


def build_graph(model: nn.Module, graph: str, keep: tuple[str, ...] = ()) -> nn.Module:
    """The model a run's attacks and defenses use for ``model.graph``: ``model`` itself for ``plain``; for
    ``optimized`` a copy with BatchNorm folded and NHWC weights (faster forward + backward w.r.t. the input for every
    shipped model on the benchmark CPU, see the module docstring)."""
    if graph == "plain":
        return model
    if graph == "optimized":
        return optimize_for_inference(model, channels_last=True, keep=keep)[0]
    raise InvalidInputError(f"model.graph: expected one of {', '.join(GRAPHS)}, got {graph!r}")


def count_batchnorms(model: nn.Module) -> int:
    """BatchNorm layers (frozen ones included) left in ``model``."""
    return sum(isinstance(m, _NORMS) for m in model.modules())
