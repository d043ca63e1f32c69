"""TARFlow/STARFlow: an autoregressive affine normalizing flow on latents N x C x H x W.

Each block is an affine autoregressive flow over the latent tokens: a causal transformer reads
the tokens before position i and outputs a shift mu_i and a scale sigma_i, and the block maps
data to noise as z_i = (x_i - mu_i) / sigma_i. The Jacobian is triangular, so the block's
log-determinant is -sum(log sigma). Blocks alternate the token order (row-major, reversed).

STARFlow's deep-shallow layout: `config.layers` lists the transformer depth of each block from
the data side. Shallow blocks (2 layers) come first, and the last, deep block sits next to the
Gaussian prior, so sampling inverts the deep block first. Class labels enter as a prefix token
of the conditional blocks (the deep one by default). Row `num_classes` of the class table is
the null class, used for dropped labels and for the unconditional half of guidance.

Spaces: callers pass raw latents; the flow models u = (latents - latent_mean) / latent_std
(per channel, identity until `set_latent_stats`). Training adds Gaussian noise of std
`noise_sigma` to u, and sampling can undo it with one score step (Tweedie's formula).

Sources: "Normalizing Flows are Capable Generative Models" (TARFlow) and "STARFlow: Scaling
Latent Normalizing Flows for High-resolution Image Synthesis"; the options mirror
apple/ml-starflow `transformer_flow.py` and `configs/starflow_3B_t2i_256x256.yaml`.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from fae_cli.errors import FaeError
from fae_cli.nn.causal_attention import CausalSelfAttention, KVCache
from fae_cli.nn.embed import patchify, unpatchify
from fae_cli.nn.mlp import Mlp
from fae_cli.nn.norm import RMSNorm
from fae_cli.nn.rope import Rope2d

# softplus(0 + INV_SOFTPLUS_ONE) = 1, so a zero network output means scale 1 in both forms.
INV_SOFTPLUS_ONE = math.log(math.e - 1)

GuidanceForm = Literal["gaussian", "linear"]


# ----------------------------------------------------------------------------------------------
# Guidance


@dataclass(frozen=True)
class FlowGuidance:
    """Classifier-free guidance of the conditional blocks at sampling.

    `scale` follows the diffusion samplers' convention: 1 gives the conditional model (but still
    runs the unconditional pass), larger values push away from the unconditional model. The
    guidance weight is w = scale - 1, which is STARFlow's `cfg` and TARFlow's `guidance` value.
    Forms: 'gaussian' (STARFlow) samples each token from the Gaussian proportional to
    p_c^(1+w) / p_u^w; 'linear' (TARFlow) extrapolates the raw outputs, a_c + w * (a_c - a_u)
    for the log-scale and the shift alike. With `anneal` the weight at step t of T is
    w * (t + 1) / T, rising along the token order.
    """

    scale: float
    form: GuidanceForm = "gaussian"
    anneal: bool = False


def guide_gaussian(
    mean_c: torch.Tensor, std_c: torch.Tensor, mean_u: torch.Tensor, std_u: torch.Tensor, weight: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return mean and std of the Gaussian proportional to N(mean_c, std_c)^(1+w) / N(mean_u, std_u)^w.

    As in STARFlow, the variance ratio (std_c / std_u)^2 is clipped at 1, which keeps the
    precision factor 1 + w - w * ratio at least 1 for w >= 0.
    """
    ratio = (std_c / std_u).clamp(max=1.0).square()
    precision = 1 + weight - weight * ratio
    mean = ((1 + weight) * mean_c - weight * ratio * mean_u) / precision
    return mean, std_c / precision.sqrt()


def _log_softplus(x: torch.Tensor) -> torch.Tensor:
    # log(softplus(x)) tends to x as x -> -inf. The clamp keeps the unused branch finite, because
    # torch.where would otherwise pass a NaN gradient from log(0).
    return torch.where(x < -20, x, F.softplus(x.clamp(min=-20)).log())


# ----------------------------------------------------------------------------------------------
# Flow block


class FlowLayer(nn.Module):
    """Pre-norm transformer layer: causal attention and a GELU MLP, each with LayerNorm."""

    def __init__(self, width: int, head_dim: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.attn = CausalSelfAttention(width, width // head_dim, head_dim)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = Mlp(width, int(width * mlp_ratio))

    def forward(
        self, h: torch.Tensor, cos: torch.Tensor | None, sin: torch.Tensor | None, cache: KVCache | None = None
    ) -> torch.Tensor:
        h = h + self.attn(self.norm1(h), cos, sin, cache)
        return h + self.mlp(self.norm2(h))


class FlowBlock(nn.Module):
    """One affine autoregressive flow over T tokens of width `token_dim` (TARFlow's MetaBlock).

    Within the block's token order, token i's (a_i, b_i) come from tokens < i: with `sos` the
    input sequence is [SOS, x_1 .. x_(T-1)], so every token is transformed; without it the
    outputs shift one place right and token 1 passes unchanged. The scale is exp(a) or, with
    `softplus`, softplus(a + ln(e - 1)); `soft_clip` c > 0 maps both raw outputs through
    c * tanh(. / c). `num_classes` > 0 makes the block conditional on a class prefix token.
    """

    def __init__(
        self,
        *,
        token_dim: int,
        grid: tuple[int, int],
        width: int,
        layers: int,
        head_dim: int,
        mlp_ratio: float,
        reverse: bool,
        num_classes: int,
        sos: bool,
        softplus: bool,
        soft_clip: float,
        rope: bool,
        final_norm: bool,
    ) -> None:
        super().__init__()
        self.token_dim = token_dim
        self.seq_len = grid[0] * grid[1]
        self.reverse = reverse
        self.num_classes = num_classes
        self.softplus = softplus
        self.soft_clip = soft_clip
        self.prefix = 1 if num_classes > 0 else 0

        self.proj_in = nn.Linear(token_dim, width)
        self.pos_embed = None if rope else nn.Parameter(torch.randn(self.seq_len, width) * 0.01)
        self.sos = nn.Parameter(torch.randn(1, 1, token_dim)) if sos else None
        self.class_embed = nn.Embedding(num_classes + 1, width) if num_classes > 0 else None
        if self.class_embed is not None:
            nn.init.normal_(self.class_embed.weight, std=0.02)
        self.layers = nn.ModuleList(FlowLayer(width, head_dim, mlp_ratio) for _ in range(layers))
        self.final_norm = RMSNorm(width) if final_norm else nn.Identity()

        # Zero weights make (a, b) the same constant for every token at initialisation, so a
        # new block starts as an elementwise affine map that ignores the other tokens.
        self.proj_out = nn.Linear(width, 2 * token_dim)
        nn.init.zeros_(self.proj_out.weight)

        # RoPE rows follow the sequence index; the class prefix gets angle 0 (no rotation).
        cos = sin = None
        if rope:
            tables = Rope2d(head_dim, *grid)
            cos = torch.cat([torch.ones(self.prefix, head_dim), tables.cos])
            sin = torch.cat([torch.zeros(self.prefix, head_dim), tables.sin])
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    @property
    def conditional(self) -> bool:
        return self.class_embed is not None

    # -- shared pieces of the parallel and the token-by-token pass

    def _ordered(self, tokens: torch.Tensor) -> torch.Tensor:
        return tokens.flip(1) if self.reverse else tokens

    def _embed(self, inputs: torch.Tensor, start: int) -> torch.Tensor:
        h = self.proj_in(inputs.to(self.proj_in.weight.dtype))
        if self.pos_embed is not None:
            h = h + self.pos_embed[start : start + inputs.shape[1]]
        return h

    def _transformer(self, h: torch.Tensor, start: int, caches: list[KVCache] | None) -> torch.Tensor:
        cos = sin = None
        if self.rope_cos is not None and self.rope_sin is not None:
            cos = self.rope_cos[start : start + h.shape[1]]
            sin = self.rope_sin[start : start + h.shape[1]]
        for index, layer in enumerate(self.layers):
            h = layer(h, cos, sin, None if caches is None else caches[index])
        return h

    def _raw_outputs(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # The affine map itself runs in float32 even under bf16 autocast.
        out = self.proj_out(self.final_norm(h)).float()
        if self.soft_clip > 0:
            out = self.soft_clip * torch.tanh(out / self.soft_clip)
        a, b = out.chunk(2, dim=-1)
        return a, b

    def log_scale(self, a: torch.Tensor) -> torch.Tensor:
        """Return log sigma for raw outputs a."""
        if self.softplus:
            return _log_softplus(a + INV_SOFTPLUS_ONE)
        return a

    # -- data -> noise

    def affine_params(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Return raw outputs (a, b), each B x T x token_dim, for tokens x in block order."""
        batch = x.shape[0]
        inputs = x
        if self.sos is not None:
            inputs = torch.cat([self.sos.expand(batch, 1, -1).to(x.dtype), x[:, :-1]], dim=1)
        h = self._embed(inputs, 0)
        if self.class_embed is not None:
            if labels is None:
                raise ValueError("a conditional flow block needs class labels (null class for none)")
            h = torch.cat([self.class_embed(labels)[:, None].to(h.dtype), h], dim=1)

        h = self._transformer(h, 0, None)[:, self.prefix :]
        a, b = self._raw_outputs(h)
        if self.sos is None:
            # Output i predicts token i + 1; the first token gets a = b = 0, the identity map.
            a = F.pad(a[:, :-1], (0, 0, 1, 0))
            b = F.pad(b[:, :-1], (0, 0, 1, 0))
        return a, b

    def forward(self, tokens: torch.Tensor, labels: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Map tokens B x T x token_dim towards noise and return (z, log-determinant per sample)."""
        x = self._ordered(tokens).float()
        a, b = self.affine_params(x, labels)
        log_scale = self.log_scale(a)
        z = (x - b) * torch.exp(-log_scale)
        return self._ordered(z), -log_scale.sum(dim=(1, 2))

    # -- noise -> data

    @torch.no_grad()
    def inverse(
        self,
        z: torch.Tensor,
        labels: torch.Tensor | None = None,
        *,
        guidance: FlowGuidance | None = None,
        use_cache: bool = True,
    ) -> torch.Tensor:
        """Invert `forward` token by token, reusing keys and values unless `use_cache` is False.

        Without the cache every step reruns the transformer over the whole sequence. `guidance`
        applies only to a conditional block and doubles the batch with the null class.
        """
        if self.conditional and labels is None:
            raise ValueError("a conditional flow block needs class labels (null class for none)")
        z = self._ordered(z).float()
        batch = z.shape[0]
        guided = guidance is not None and labels is not None and self.conditional
        if guided:
            z = torch.cat([z, z])
            labels = torch.cat([labels, torch.full_like(labels, self.num_classes)])

        x = z.clone()
        steps = self.seq_len if self.sos is not None else self.seq_len - 1
        caches = self._start_caches(labels) if use_cache else None
        for step in range(steps):
            target = step if self.sos is not None else step + 1
            if caches is not None:
                a, b = self._cached_step(x, step, caches)
            else:
                a_all, b_all = self.affine_params(x, labels)
                a, b = a_all[:, target], b_all[:, target]
            mean, std = self._step_gaussian(a, b, guidance if guided else None, (step + 1) / steps)
            x[:, target] = mean + std * z[:, target]

        return self._ordered(x[:batch])

    def _start_caches(self, labels: torch.Tensor | None) -> list[KVCache]:
        caches = [KVCache(self.prefix + self.seq_len) for _ in self.layers]
        if self.class_embed is not None and labels is not None:
            prefix = self.class_embed(labels)[:, None].to(self.proj_in.weight.dtype)
            self._transformer(prefix, 0, caches)
        return caches

    def _cached_step(self, x: torch.Tensor, step: int, caches: list[KVCache]) -> tuple[torch.Tensor, torch.Tensor]:
        # With SOS, the input at sequence index `step` is SOS or the previous token. Without it,
        # the input is token `step` itself, whose output sets token `step + 1`.
        if self.sos is None:
            inputs = x[:, step : step + 1]
        elif step == 0:
            inputs = self.sos.expand(x.shape[0], 1, -1)
        else:
            inputs = x[:, step - 1 : step]
        h = self._transformer(self._embed(inputs, step), self.prefix + step, caches)
        a, b = self._raw_outputs(h)
        return a[:, 0], b[:, 0]

    def _step_gaussian(
        self, a: torch.Tensor, b: torch.Tensor, guidance: FlowGuidance | None, progress: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if guidance is None:
            return b, torch.exp(self.log_scale(a))

        weight = (guidance.scale - 1) * (progress if guidance.anneal else 1.0)
        a_c, a_u = a.chunk(2)
        b_c, b_u = b.chunk(2)
        if guidance.form == "linear":
            mean = b_c + weight * (b_c - b_u)
            std = torch.exp(self.log_scale(a_c + weight * (a_c - a_u)))
        else:
            std_c, std_u = torch.exp(self.log_scale(a_c)), torch.exp(self.log_scale(a_u))
            mean, std = guide_gaussian(b_c, std_c, b_u, std_u, weight)

        # Both halves continue from the guided token, so later steps see the same prefix.
        return torch.cat([mean, mean]), torch.cat([std, std])


# ----------------------------------------------------------------------------------------------
# Model


@dataclass(frozen=True)
class FlowConfig:
    """Architecture and training constants of a `TransformerFlow`; stored in checkpoint metadata."""

    in_channels: int  # latent channels C
    input_size: int  # latent height = width
    num_classes: int  # 0 = unconditional
    layers: tuple[int, ...]  # transformer layers per block from the data side, deep block last
    width: int  # transformer width of every block
    head_dim: int = 64
    patch_size: int = 1  # latent patch per token; token width C * patch^2
    mlp_ratio: float = 4.0
    sos: bool = True  # learned start token, so the first token is transformed too
    softplus: bool = True  # scale softplus(a + ln(e - 1)) instead of exp(a)
    soft_clip: float = 4.0  # c in c * tanh(out / c) on the raw outputs, 0 = off
    rope: bool = True  # 2-D RoPE instead of a learned position table
    final_norm: bool = True  # RMSNorm before the output projection
    conditioning: Literal["deep", "all"] = "deep"  # which blocks see the class label
    label_drop: float = 0.1  # training probability of the null class
    noise_sigma: float = 0.3  # std of the training noise on normalised latents

    def __post_init__(self) -> None:
        if self.input_size % self.patch_size:
            raise ValueError(f"latent size {self.input_size} is not divisible by patch size {self.patch_size}")
        if self.width % self.head_dim:
            raise ValueError(f"flow width {self.width} is not divisible by head width {self.head_dim}")
        if not self.layers or min(self.layers) < 1:
            raise ValueError(f"flow layers per block must be positive, got {list(self.layers)}")
        if self.noise_sigma < 0 or not 0 <= self.label_drop <= 1 or self.soft_clip < 0:
            raise ValueError(
                f"invalid flow settings noise_sigma={self.noise_sigma}, soft_clip={self.soft_clip}, label_drop={self.label_drop}:"
                " use noise_sigma >= 0, soft_clip >= 0 and label_drop in [0, 1]"
            )

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-serialisable dict that `FlowConfig.from_dict` turns back into this config."""
        data = asdict(self)
        data["layers"] = list(self.layers)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FlowConfig:
        return cls(**{**data, "layers": tuple(data["layers"])})


@dataclass
class FlowNLL:
    """Per-sample negative log-likelihood of a batch."""

    nll: torch.Tensor  # nats per sample of the raw latents, including the normalisation Jacobian
    bits_per_dim: torch.Tensor  # of the normalised latents, so independent of the latent scale


class TransformerFlow(nn.Module):
    """STARFlow-style stack of `FlowBlock`s on latents N x C x H x W (see the module docstring)."""

    def __init__(self, config: FlowConfig) -> None:
        super().__init__()
        self.config = config
        tokens_per_side = config.input_size // config.patch_size
        self.grid = (tokens_per_side, tokens_per_side)
        self.num_dims = config.in_channels * config.input_size**2

        count = len(config.layers)
        blocks = []
        for index, depth in enumerate(config.layers):
            deep = index == count - 1
            conditional = deep or config.conditioning == "all"
            blocks.append(
                FlowBlock(
                    token_dim=config.in_channels * config.patch_size**2,
                    grid=self.grid,
                    width=config.width,
                    layers=depth,
                    head_dim=config.head_dim,
                    mlp_ratio=config.mlp_ratio,
                    reverse=(count - 1 - index) % 2 == 1,  # the deep block reads row-major order
                    num_classes=config.num_classes if conditional else 0,
                    sos=config.sos,
                    softplus=config.softplus,
                    soft_clip=config.soft_clip,
                    rope=config.rope,
                    final_norm=config.final_norm,
                )
            )
        self.blocks = nn.ModuleList(blocks)

        self.register_buffer("latent_mean", torch.zeros(config.in_channels))
        self.register_buffer("latent_std", torch.ones(config.in_channels))

    # -- spaces and labels

    def set_latent_stats(self, mean: torch.Tensor | list[float], std: torch.Tensor | list[float]) -> None:
        """Set the per-channel statistics that map raw latents to the flow's normalised space."""
        self.latent_mean.copy_(torch.as_tensor(mean, dtype=torch.float32))
        self.latent_std.copy_(torch.as_tensor(std, dtype=torch.float32))

    def normalize(self, latents: torch.Tensor) -> torch.Tensor:
        self._check_shape(latents)
        return (latents.float() - self.latent_mean[:, None, None]) / self.latent_std[:, None, None]

    def denormalize(self, u: torch.Tensor) -> torch.Tensor:
        return u * self.latent_std[:, None, None] + self.latent_mean[:, None, None]

    def _check_shape(self, latents: torch.Tensor) -> None:
        expected = (self.config.in_channels, self.config.input_size, self.config.input_size)
        if latents.dim() != 4 or tuple(latents.shape[1:]) != expected:
            raise ValueError(f"flow expects latents N x {expected[0]} x {expected[1]} x {expected[2]}, got {tuple(latents.shape)}")

    def class_indices(
        self, labels: torch.Tensor | None, batch: int, drop_mask: torch.Tensor | None = None
    ) -> torch.Tensor | None:
        """Map labels to class-table rows: -1, dropped or missing labels become the null class."""
        if self.config.num_classes == 0:
            return None
        null = self.config.num_classes
        device = self.latent_mean.device
        if labels is None:
            return torch.full((batch,), null, dtype=torch.long, device=device)

        labels = labels.to(device=device, dtype=torch.long)
        if labels.numel() and int(labels.max()) >= null:
            raise ValueError(f"class label {int(labels.max())} is out of range for {null} classes")
        indices = torch.where(labels < 0, torch.full_like(labels, null), labels)
        if drop_mask is not None:
            indices = torch.where(drop_mask.to(device), torch.full_like(indices, null), indices)
        return indices

    # -- likelihood

    def encode(self, u: torch.Tensor, classes: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Map normalised latents to noise and return (z N x C x H x W, log-determinant per sample)."""
        tokens = patchify(u, self.config.patch_size)
        logdet = u.new_zeros(u.shape[0], dtype=torch.float32)
        for block in self.blocks:
            tokens, block_logdet = block(tokens, classes if block.conditional else None)
            logdet = logdet + block_logdet
        return unpatchify(tokens, self.config.patch_size, *u.shape[2:]), logdet

    def _nll_normalized(self, u: torch.Tensor, classes: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # -log p(u) = 0.5 |z|^2 + (D / 2) log(2 pi) - log|det dz/du|, in nats per sample.
        z, logdet = self.encode(u, classes)
        prior = 0.5 * z.square().sum(dim=(1, 2, 3))
        nll = prior + 0.5 * self.num_dims * math.log(2 * math.pi) - logdet
        return nll, prior, logdet

    def nll(self, latents: torch.Tensor, labels: torch.Tensor | None = None) -> FlowNLL:
        """Return the exact NLL of raw latents (no noise, no label drop).

        The raw latent x = latent_mean + latent_std * u has density p(u) / prod(latent_std), so
        `nll` adds H * W * sum(log latent_std) to -log p(u). Rescaling the data and its
        statistics by s leaves u and `bits_per_dim` unchanged and adds D * log(s) to `nll`.
        """
        u = self.normalize(latents)
        nll_u, _, _ = self._nll_normalized(u, self.class_indices(labels, u.shape[0]))
        log_std = self.latent_std.log().sum() * self.config.input_size**2
        return FlowNLL(nll=nll_u + log_std, bits_per_dim=nll_u / (self.num_dims * math.log(2)))

    def forward(
        self,
        latents: torch.Tensor,
        labels: torch.Tensor | None = None,
        *,
        noise: torch.Tensor | None = None,
        drop_mask: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Return the training objective on raw latents: key 'loss' plus detached metrics.

        The objective is the forward pass so that DDP synchronises its gradients. It trains on
        u + noise_sigma * noise (`noise` standard normal, drawn here when None); 'loss' is the
        batch-mean NLL in nats per dimension. Labels are dropped to the null class where
        `drop_mask` is True, or with probability `label_drop` in training mode when it is None.
        """
        u = self.normalize(latents)
        if noise is None:
            noise = torch.randn_like(u)
        u = u + self.config.noise_sigma * noise

        if drop_mask is None and self.training and self.config.label_drop > 0:
            drop_mask = torch.rand(u.shape[0], device=u.device) < self.config.label_drop
        classes = self.class_indices(labels, u.shape[0], drop_mask)

        # NOTE: STARFlow's released text-to-image config also adds 1e-4 * mean(h^2) of each
        # intermediate block output; this loss is the plain NLL without that regulariser.
        nll, prior, logdet = self._nll_normalized(u, classes)
        loss = nll.mean() / self.num_dims
        return {
            "loss": loss,
            "bits_per_dim": loss.detach() / math.log(2),
            "prior": prior.detach().mean() / self.num_dims,
            "logdet": logdet.detach().mean() / self.num_dims,
        }

    # -- sampling

    @torch.no_grad()
    def sample(
        self,
        noise: torch.Tensor,
        labels: torch.Tensor | None = None,
        *,
        guidance: FlowGuidance | None = None,
        use_cache: bool = True,
        denoise: bool = True,
        sigma_override: float | None = None,
    ) -> torch.Tensor:
        """Map standard-normal noise N x C x H x W to raw latents, deep block first.

        `guidance` (None = off) applies in the conditional blocks. With `denoise`, the result
        gets one `denoise` step with the training sigma, or with `sigma_override` when given.
        """
        if guidance is not None and self.config.num_classes == 0:
            raise ValueError("guidance needs a class-conditional flow")
        self._check_shape(noise)
        classes = self.class_indices(labels, noise.shape[0])

        tokens = patchify(noise.float(), self.config.patch_size)
        for block in reversed(self.blocks):
            block_classes = classes if block.conditional else None
            tokens = block.inverse(tokens, block_classes, guidance=guidance, use_cache=use_cache)
        latents = self.denormalize(unpatchify(tokens, self.config.patch_size, *noise.shape[2:]))

        if denoise:
            latents = self.denoise(latents, labels, sigma_override=sigma_override)
        return latents

    def denoise(
        self, latents: torch.Tensor, labels: torch.Tensor | None = None, *, sigma_override: float | None = None
    ) -> torch.Tensor:
        """Apply one Tweedie step u <- u + sigma^2 * grad log p(u) in the normalised space.

        Training saw u + sigma * noise, so the flow's density is that of the noisy latents and
        its score moves a sample to the posterior mean of the clean one. The gradient runs
        through every block, conditioned on `labels`. sigma is the training `noise_sigma`
        unless `sigma_override` is given.
        """
        sigma = self.config.noise_sigma if sigma_override is None else sigma_override
        classes = self.class_indices(labels, latents.shape[0])
        with torch.enable_grad():
            u = self.normalize(latents).detach().requires_grad_(True)
            nll, _, _ = self._nll_normalized(u, classes)
            (grad,) = torch.autograd.grad(nll.sum(), u)
        return self.denormalize(u.detach() - sigma**2 * grad)


# ----------------------------------------------------------------------------------------------
# Named sizes


# Layers per block from the data side (deep block last), width and head width. XL is
# STARFlow's 1.4B `TarFlow_XLv2_1` layout. S and B are smaller layouts of this package, not
# STARFlow presets, and debug is for tests.
FLOW_SIZES: dict[str, dict[str, Any]] = {
    "debug": {"layers": (1, 1, 2), "width": 64, "head_dim": 16},
    "S": {"layers": (2, 2, 2, 6), "width": 384, "head_dim": 64},
    "B": {"layers": (2, 2, 2, 2, 2, 12), "width": 768, "head_dim": 64},
    "XL": {"layers": (2, 2, 2, 2, 2, 18), "width": 2048, "head_dim": 64},
}

_NAME = re.compile(r"STARFlow-(?P<size>[A-Za-z]+)(?:/(?P<patch>\d+))?")


def flow_names() -> list[str]:
    return [f"STARFlow-{size}" for size in FLOW_SIZES]


def build_flow(
    name: str,
    *,
    in_channels: int,
    input_size: int,
    num_classes: int,
    label_drop: float = 0.1,
    noise_sigma: float = 0.3,
    **options: Any,
) -> TransformerFlow:
    """Build a named flow, e.g. 'STARFlow-S' or 'STARFlow-XL/1' (the suffix is the patch size).

    `options` override any other `FlowConfig` field, e.g. `sos=False, softplus=False,
    soft_clip=0, rope=False, conditioning="all"` for TARFlow's variant of each piece.
    """
    match = _NAME.fullmatch(name)
    if match is None or match["size"] not in FLOW_SIZES:
        raise FaeError(f"unknown flow model {name!r} (generator.model, with generator.family = 'flow'): use one of {', '.join(flow_names())} (optionally with /<patch>)")

    settings = {**FLOW_SIZES[match["size"]], **options}
    if match["patch"] is not None:
        settings["patch_size"] = int(match["patch"])
    config = FlowConfig(
        in_channels=in_channels,
        input_size=input_size,
        num_classes=num_classes,
        label_drop=label_drop,
        noise_sigma=noise_sigma,
        **settings,
    )
    return TransformerFlow(config)


def flow_from_config(config: dict[str, Any]) -> TransformerFlow:
    """Rebuild a flow from `model.config.to_dict()` as stored in checkpoint metadata."""
    return TransformerFlow(FlowConfig.from_dict(config))
