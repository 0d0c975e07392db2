"""Multi-scale SSIM as NeMo scores noise differences (Hintersdorf et al. 2024, "Finding NeMo").

NeMo calls torchmetrics' `multiscale_structural_similarity_index_measure` (v1.3.2, kernel 11,
betas 0.33 x 3, normalize="relu") with its default `data_range=None`. That default does not mean
"images in [0, 1]": at every scale the range is recomputed from the whole call's batch,
max(a.max() - a.min(), b.max() - b.min()), so the constants C1 = (0.01 r)^2, C2 = (0.03 r)^2 and
hence each pair's value depend on the other pairs in the same call (and shrink at coarser scales,
where average pooling narrows the range). `data_range=None` here reproduces that arithmetic;
a number fixes the range at every scale (1.0: the min-max scaled inputs' nominal range).

The arithmetic follows torchmetrics 1.3.2 (re-written here, not imported: a version's behaviour
must not change memtrain's numbers): Gaussian window (sigma 1.5, 11 taps), reflect padding then a
crop of the padded border, variances clamped at 0, relu on SSIM and contrast-structure terms,
result prod_s cs_s^beta_s with SSIM at the coarsest scale. Images smaller than torchmetrics
accepts (44 px for 3 scales) are memtrain's extension: fewer scales, then a smaller window.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _gaussian_kernel(size: int, sigma: float, channels: int, like: torch.Tensor) -> torch.Tensor:
    coords = torch.arange((1 - size) / 2, (1 + size) / 2, 1, dtype=like.dtype, device=like.device)
    g = torch.exp(-torch.pow(coords / sigma, 2) / 2)
    g = (g / g.sum()).unsqueeze(0)
    return torch.matmul(g.t(), g).expand(channels, 1, size, size)


def batch_data_range(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """torchmetrics' `data_range=None`: the larger of the two batches' value ranges."""
    return torch.maximum(x.max() - x.min(), y.max() - y.min())


def _ssim_and_cs(x: torch.Tensor, y: torch.Tensor, size: int, sigma: float,
                 data_range: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample mean SSIM and contrast-structure term, reflect-padded then cropped."""
    n, channels = x.shape[:2]
    r = batch_data_range(x, y) if data_range is None else data_range
    c1, c2 = (0.01 * r) ** 2, (0.03 * r) ** 2
    pad = (size - 1) // 2
    kernel = _gaussian_kernel(size, sigma, channels, x)
    if pad:
        x, y = F.pad(x, [pad] * 4, mode="reflect"), F.pad(y, [pad] * 4, mode="reflect")
    mu_x, mu_y, xx, yy, xy = F.conv2d(torch.cat([x, y, x * x, y * y, x * y]), kernel,
                                      groups=channels).split(n)
    mu_xx, mu_yy, mu_xy = mu_x.pow(2), mu_y.pow(2), mu_x * mu_y
    var_x, var_y = (xx - mu_xx).clamp_min(0.0), (yy - mu_yy).clamp_min(0.0)
    upper = 2 * (xy - mu_xy) + c2
    lower = var_x + var_y + c2
    ssim = ((2 * mu_xy + c1) * upper) / ((mu_xx + mu_yy + c1) * lower)
    cs = upper / lower
    if pad:
        ssim, cs = ssim[..., pad:-pad, pad:-pad], cs[..., pad:-pad, pad:-pad]
    return ssim.flatten(1).mean(1), cs.flatten(1).mean(1)


def ms_ssim_settings(height: int, width: int, kernel_size: int = 11,
                     scales: int = 3) -> tuple[int, int]:
    """(kernel, scales) that fit the image: NeMo's MS-SSIM (11, 3) on 64x64 SD latents; fewer
    scales, then a smaller odd kernel, for small latents."""
    side = min(height, width)
    # the reflect-pad-then-crop scheme needs at least `kernel_size` pixels at every scale
    while scales > 1 and side // 2 ** (scales - 1) < kernel_size:
        scales -= 1
    if side < kernel_size:
        kernel_size = max(1, side if side % 2 else side - 1)
    return kernel_size, scales


def ms_ssim(x: torch.Tensor, y: torch.Tensor, kernel_size: int = 11, sigma: float = 1.5,
            betas: tuple[float, ...] = (0.33, 0.33, 0.33),
            data_range: float | None = None) -> torch.Tensor:
    """Multi-scale SSIM per sample (N,) as torchmetrics 1.3.2 computes it with normalize='relu':
    prod_s relu(cs_s)^beta_s with relu(ssim) at the coarsest scale. `data_range=None` (NeMo's
    call): the batch's range, recomputed at each scale; a number: that range at every scale.
    Scales that do not fit the image are dropped and the remaining betas rescaled to the same
    total."""
    kernel_size, scales = ms_ssim_settings(x.shape[-2], x.shape[-1], kernel_size, len(betas))
    weights = torch.tensor(betas[:scales], dtype=torch.float32, device=x.device)
    if scales < len(betas):
        weights = weights * (sum(betas) / weights.sum())
    x, y = x.float(), y.float()
    terms = []
    for scale in range(scales):
        ssim, cs = _ssim_and_cs(x, y, kernel_size, sigma, data_range)
        terms.append(torch.relu(ssim if scale == scales - 1 else cs))
        if scale < scales - 1:
            x, y = F.avg_pool2d(x, 2), F.avg_pool2d(y, 2)
    return torch.prod(torch.stack(terms) ** weights.view(-1, 1), dim=0)


def pairwise_ms_ssim(diffs: torch.Tensor, data_range: float | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """All pairs i < j of the (S, C, H, W) batch, lexicographic (torch.combinations), and their
    MS-SSIM, computed in ONE call as NeMo does (with `data_range=None` the call's range, and so
    each value, depends on every pair in it)."""
    pairs = torch.combinations(torch.arange(diffs.shape[0]), r=2)
    return pairs, ms_ssim(diffs[pairs[:, 0]], diffs[pairs[:, 1]], data_range=data_range)


def max_pairwise_ssim(diffs: torch.Tensor, data_range: float | None = None) -> torch.Tensor:
    """(S,) for each sample, the max MS-SSIM of its noise_diff against every other sample's."""
    count = diffs.shape[0]
    pairs, scores = pairwise_ms_ssim(diffs, data_range)
    best = torch.full((count,), -math.inf)
    for (i, j), score in zip(pairs.tolist(), scores.cpu().tolist()):
        best[i], best[j] = max(best[i], score), max(best[j], score)
    return best
