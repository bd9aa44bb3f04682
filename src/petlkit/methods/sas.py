"""SaS: Shared and Specific parameters (RECONSTRUCTION, see docs/methods/sas.md).

At every block l and site p (attn_in: what q/k/v read; mlp_in: what fc1 reads):

    y = x + s·(x A_p) B_p  +  x ⊙ a_{l,p} + b_{l,p},     (a_{l,p}, b_{l,p}) = H_p(e_l)

One low-rank pair (A_p, B_p) per site kind is shared by all blocks; a hypernetwork H_p per site
kind turns a learned layer embedding e_l into that layer's scale and shift. Both are linear in x,
so the whole update folds into the linears that read the site (merge).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from functools import partial

import torch
from torch import nn

from petlkit.config import (
    MethodConfig,
    check_choice,
    check_positive_int,
    check_probability,
    check_range,
)
from petlkit.errors import ConfigError, NotFoldableError, NotMergeableError
from petlkit.layout import layout_of
from petlkit.methods.base import Method, Tuner
from petlkit.methods.folding import fold_refusal
from petlkit.methods.linears import as_weight, out_in_weight
from petlkit.methods.placement import CastLinear, cast_to, compute_dtype, compute_input, follow
from petlkit.methods.sas_site import SiteTransform, site_constants, site_rows
from petlkit.methods.targeting import get_module
from petlkit.registry import register_method

SITES = ("attn_in", "mlp_in")


def _wide(device: torch.device) -> torch.dtype:
    """The merge arithmetic's dtype: float64, except on devices without it (Apple MPS)."""
    return torch.float32 if device.type == "mps" else torch.float64


@dataclasses.dataclass(frozen=True)
class SaSConfig(MethodConfig):
    """rank: r of the shared pair; embed_dim: k of the layer embeddings; hidden: h of the
    hypernetwork; scale: s on the shared path; shared / specific: the two modules' switches."""

    rank: int = 4
    embed_dim: int = 8
    hidden: int = 8
    scale: float = 1.0
    dropout: float = 0.0
    sites: Sequence[str] = SITES
    shared: bool = True
    specific: bool = True

    def validate(self) -> None:
        for name in ("rank", "embed_dim", "hidden"):
            check_positive_int("SaSConfig", name, getattr(self, name))
        check_range("SaSConfig", "scale", self.scale, -100, 100)
        check_probability("SaSConfig", "dropout", self.dropout)
        if not self.sites or len(set(self.sites)) != len(self.sites):
            raise ConfigError(f"SaSConfig.sites must name distinct sites from {list(SITES)}")
        for site in self.sites:
            check_choice("SaSConfig", "sites", site, SITES)
        if not (self.shared or self.specific):
            raise ConfigError("SaSConfig: shared and specific are both off; turn one on")


class SiteModule(nn.Module):
    """The parameters of one site kind: the shared pair and the hypernetwork."""

    def __init__(self, width: int, cfg: SaSConfig) -> None:
        super().__init__()
        if cfg.shared:
            self.down = nn.Parameter(torch.empty(width, cfg.rank))
            self.up = nn.Parameter(torch.zeros(cfg.rank, width))
            nn.init.kaiming_uniform_(self.down.T, a=math.sqrt(5))
        if cfg.specific:
            self.hyper = nn.Sequential(
                CastLinear(cfg.embed_dim, cfg.hidden), nn.GELU(), CastLinear(cfg.hidden, 2 * width)
            )
            nn.init.zeros_(self.hyper[2].weight)
            nn.init.zeros_(self.hyper[2].bias)


class SaSFolded(Tuner):
    """A linear that reads a SaS site, run with the site's transform folded into its weight while
    SaS trains folded: W' = W·Mᵀ = W + s·(W·upᵀ)·downᵀ + W·diag(a_l), c' = c + W·b_l. It owns no
    parameters; they stay SaS's."""

    def __init__(self, base_layer: nn.Module, owner: str, sas: SaS, site: str, index: int):
        super().__init__(base_layer, owner)
        self.__dict__["_sas"] = sas  # a reference, not a submodule: the parameters stay SaS's
        self.site, self.index = site, index
        self.folded = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return self.base_layer(x)
        return self.forward_folded(x)

    def delta(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        base = self.base_layer
        d_weight, d_bias = self._sas.consumer_delta(self.site, self.index, out_in_weight(base))
        return as_weight(base, d_weight), d_bias

    def fold_refusal(self) -> str | None:
        return None


@register_method("sas")
class SaS(Method):
    config_cls = SaSConfig
    default_lr = 1e-2
    transient = ("_cache", "_cache_key", "_per_layer")
    merge_refusal = None
    merge_late = True  # folds into q/k/v and fc1: after the methods that wrap those merged

    def attach(self, model: nn.Module) -> None:
        cfg = self.config
        self.layout = layout_of(model)
        width, depth = self.layout.width, self.layout.depth
        self.site_modules = nn.ModuleDict({s: SiteModule(width, cfg) for s in cfg.sites})
        if cfg.specific:
            self.layer_embeddings = nn.Parameter(
                torch.randn(depth, cfg.embed_dim) / math.sqrt(cfg.embed_dim)
            )
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()
        self._cache: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None
        self._cache_key: tuple | None = None
        self._per_layer: dict = {}  # this forward's per-block tensors: (site, dtype, device) →
        # the plain ops', (site, "node", dtype, device) → the site nodes' rows, and
        # ("unit", width, dtype, device) → the (ones, zeros) every site node reads
        self._handles: list = []
        self._originals: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
        self._register_hooks(model)

    # -- hooks -------------------------------------------------------------------------------
    def _register_hooks(self, model: nn.Module) -> None:
        self._handles.append(model.register_forward_pre_hook(self._refresh))
        for index, block in enumerate(self.layout.blocks):
            for site in self.config.sites:
                reader, linears = block.site(site)
                hook = partial(self._site_hook, site, index)
                for name in [reader] if reader else linears:  # no common reader: each linear
                    module = get_module(model, name)
                    self._handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))

    def detach(self, model: nn.Module) -> None:
        if self.folded:
            self.set_folded(model, False)
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _site_hook(self, site: str, index: int, module: nn.Module, args: tuple, kwargs: dict):
        if not self.enabled or self.folded:  # folded: the consumers' weights carry the transform
            return None
        if args:
            return (self.transform(site, index, args[0]), *args[1:]), kwargs
        kwargs = dict(kwargs, hidden_states=self.transform(site, index, kwargs["hidden_states"]))
        return args, kwargs

    # -- the specific module: generated once per forward, cached in inference ------------------
    def _refresh(self, module: nn.Module, args: tuple) -> None:
        """Root pre-hook: run the hypernetworks once for all layers, before any block runs."""
        self._per_layer = {}
        if not (self.enabled and self.config.specific):
            return
        if torch.compiler.is_compiling():  # the cache keys on tensor versions: eager only
            self._cache, self._cache_key = self.generate(), None
            return
        inference = not torch.is_grad_enabled()
        key = tuple(p._version for p in self.parameters()) + (self.training,)
        if not (inference and self._cache is not None and self._cache_key == key):
            self._cache = self.generate()
            self._cache_key = key if inference else None

    def generate(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Per site: (scale a, shift b), each (depth, width), from the layer embeddings, computed
        in the dtype the backbone computes in (autocast's bf16: what autocast would cast the
        hypernetworks' inputs to), from the forward's casts of the parameters, not a cast each."""
        e = self.layer_embeddings
        e = cast_to(e, compute_dtype(e), e.device)
        out = {}
        for site, sm in self.site_modules.items():
            a, b = sm.hyper(e).chunk(2, dim=-1)
            out[site] = (a, b)
        return out

    def transform(self, site: str, index: int, x: torch.Tensor) -> torch.Tensor:
        """x + x⊙a_l + b_l + s·(x·down)·up in the dtype the site's linears compute in. With both
        modules and no dropout acting, one autograd node (sas_site.py) that reads x as it comes (a
        float32 layer-norm output under autocast: the node's one pass is the cast the linears
        would make); otherwise three kernels (addcmul, the rank-r product, addmm)."""
        dropping = isinstance(self.dropout, nn.Dropout) and self.dropout.training
        if (self.config.shared and self.config.specific and not dropping
                and not torch.compiler.is_compiling()):  # fmt: skip
            rows, (ones, zeros) = self._site_rows(site, x)
            flat = x.reshape(-1, x.shape[-1])
            y = SiteTransform.apply(flat, *rows[index], ones, zeros)
            return y.view(x.shape)
        x = compute_input(x)
        scale, shift, down, up = self._layer_tensors(site, x)
        flat = x.reshape(-1, x.shape[-1])
        y = flat if scale is None else torch.addcmul(shift[index], flat, scale[index])
        if down is not None:
            y = torch.addmm(y, self.dropout(flat) @ down[index], up[index], alpha=self.config.scale)
        return y.view(x.shape)

    def _site_rows(self, site: str, x: torch.Tensor) -> tuple[list, tuple]:
        """Every block's SiteTransform inputs for this site kind (sas_site.site_rows), made
        once per forward: a in float32 (at least) from the hypernetwork's output, b and B in
        the compute dtype, A in its own."""
        dtype, device = compute_dtype(x), x.device
        key = (site, "node", dtype, device)
        if key not in self._per_layer:
            sm = self.site_modules[site]
            if self._cache is None:
                self._cache = self.generate()
            a, b = self._cache[site]
            unit = ("unit", x.shape[-1], dtype, device)
            if unit not in self._per_layer:
                self._per_layer[unit] = site_constants(self.config.rank, x.shape[-1], dtype,
                                                       device)  # fmt: skip
            zeros = self._per_layer[unit][1]  # in the dtype the scale's gradient is summed in
            scale = a.to(device=device, dtype=zeros.dtype) + 1.0
            up = cast_to(sm.up, dtype, device)
            down = cast_to(sm.down, sm.down.dtype, device)
            rows = site_rows(scale, cast_to(b, dtype, device), down, up, self.config.scale, dtype)
            self._per_layer[key] = (rows, self._per_layer[unit])
        return self._per_layer[key]

    def _layer_tensors(self, site: str, x: torch.Tensor) -> tuple:
        """Per block: (1 + a_l, b_l) and the shared (down, up), in x's dtype and device, cast
        once per forward for all blocks (not once per block) and split with one unbind."""
        key = (site, x.dtype, x.device)
        if key not in self._per_layer:
            sm = self.site_modules[site]
            scale = shift = down = up = None
            if self.config.specific:
                if self._cache is None:
                    self._cache = self.generate()
                a, b = self._cache[site]
                scale, shift = (follow(t, x).unbind(0) for t in (1.0 + a, b))
            if self.config.shared:
                depth = len(self.layout.blocks)
                down, up = (follow(t, x).expand(depth, *t.shape).unbind(0)
                            for t in (sm.down, sm.up))  # fmt: skip
            self._per_layer[key] = (scale, shift, down, up)
        return self._per_layer[key]

    # -- folded training (methods/folding.py) -------------------------------------------------
    def _consumers(self) -> list[tuple[str, int, str]]:
        """(site, block index, name) of every linear that reads a site."""
        return [
            (site, i, name)
            for i, block in enumerate(self.layout.blocks)
            for site in self.config.sites
            for name in block.site(site)[1]
        ]

    def fold_refusal(self, model: nn.Module) -> str | None:
        if self.merged:
            return "it is merged into the weights already (unmerge first)"
        if self.folded:
            return None
        if self.config.dropout > 0:
            return "SaS dropout acts on the site's input, not on a weight (set dropout=0)"
        for _, _, name in self._consumers():
            reason = fold_refusal(model.get_submodule(name))
            if reason is not None:
                return f"{name}: {reason}"
        return None

    def set_folded(self, model: nn.Module, folded: bool) -> None:
        """Folded: every linear reading a site runs with W·Mᵀ (one F.linear, the transform's
        cost d·d·r per step instead of per token) and the site hooks pass the input through."""
        if folded == self.folded:
            return
        if folded:
            reason = self.fold_refusal(model)
            if reason is not None:
                raise NotFoldableError(f"{self.name!r} (sas) cannot train folded: {reason}; "
                                       "train unfolded (fold: off)")  # fmt: skip
            for site, index, name in self._consumers():
                self.wrap(model, name, partial(SaSFolded, owner=self.name, sas=self,
                                               site=site, index=index))  # fmt: skip
                model.get_submodule(name).enabled = self.enabled
        else:
            Method.detach(self, model)  # unwraps the SaSFolded wrappers, keeps the hooks
        self.folded = folded

    def consumer_delta(
        self, site: str, index: int, weight: torch.Tensor
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(ΔW, Δc) of a linear with weight W reading the site of block `index`, differentiable
        in SaS's parameters, in float32 (at least) on W's device."""
        sm = self.site_modules[site]
        w = weight.to(torch.promote_types(weight.dtype, torch.float32))
        d_weight = d_bias = None
        if self.config.shared:
            d_weight = self.config.scale * (w @ sm.up.to(w).T) @ sm.down.to(w).T
        if self.config.specific:
            if self._cache is None:
                self._cache = self.generate()
            a, b = self._cache[site]
            scaled = w * a[index].to(w)  # W·diag(a_l)
            d_weight = scaled if d_weight is None else d_weight + scaled
            d_bias = w @ b[index].to(w)
        return d_weight, d_bias

    # -- merge -------------------------------------------------------------------------------
    def site_matrices(
        self, site: str, index: int, generated: dict | None, like: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(M, b) with y = x·M + b for the site of block `index`, in float64 (float32 where the
        device has no float64) on the device of `like` (the weight the site folds into)."""
        sm = self.site_modules[site]
        kind = {"device": like.device, "dtype": _wide(like.device)}
        width = self.layout.width
        matrix = torch.eye(width, **kind)
        shift = torch.zeros(width, **kind)
        if self.config.shared:
            matrix += self.config.scale * (sm.down.to(**kind) @ sm.up.to(**kind))
        if self.config.specific:
            a, b = generated[site]
            matrix += torch.diag(a[index].to(**kind))
            shift += b[index].to(**kind)
        return matrix, shift

    @torch.no_grad()
    def merge(self, model: nn.Module) -> None:
        """W' = W·Mᵀ and c' = c + W·b for every linear that reads a site; hooks removed."""
        if self.folded:
            self.set_folded(model, False)
        consumers = self._consumers()
        wrapped = [n for _, _, n in consumers if isinstance(model.get_submodule(n), Tuner)]
        if wrapped:
            raise NotMergeableError(
                f"SaS folds into {wrapped[0]}, which another method wraps; merge or remove that "
                "method first"
            )
        generated = self.generate() if self.config.specific else None
        for site, index, name in consumers:
            linear = get_module(model, name)
            matrix, shift = self.site_matrices(site, index, generated, linear.weight)
            weight = out_in_weight(linear).to(matrix.dtype)
            bias = weight.new_zeros(weight.shape[0])
            if linear.bias is not None:
                bias = linear.bias.to(matrix.dtype)
            self._originals[name] = (
                linear.weight.detach().clone(),
                None if linear.bias is None else linear.bias.detach().clone(),
            )
            # both from the original weight: `weight` is linear.weight itself when the weight
            # already has the merge dtype (float64 models; float32 on MPS)
            new_bias = (bias + weight @ shift).to(linear.weight.dtype)
            linear.weight.copy_(as_weight(linear, weight @ matrix.T).to(linear.weight.dtype))
            if linear.bias is None:
                linear.bias = nn.Parameter(new_bias, requires_grad=False)
            else:
                linear.bias.copy_(new_bias)
        self.detach(model)

    @property
    def merged(self) -> bool:
        return bool(self._originals)

    @torch.no_grad()
    def unmerge(self, model: nn.Module) -> None:
        """Put back the exact original weights (kept, not inverted) and the hooks."""
        if not self._originals:
            return
        for name, (weight, bias) in self._originals.items():
            linear = get_module(model, name)
            linear.weight.copy_(weight)
            if bias is None:
                linear.bias = None
            else:
                linear.bias.copy_(bias)
        self._originals.clear()
        self._cache, self._per_layer = None, {}
        self._register_hooks(model)
