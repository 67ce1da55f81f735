"""Strong augmentation, batched on the device: the RandAugment + Cutout of FixMatch that MLKD
(Jin et al., CVPR 2023) uses for its strong view, applied to uint8 image batches without
per-sample Python.

Each image gets ``num_ops`` operations drawn uniformly from :data:`OPS` (with repetition), each
at a magnitude drawn uniformly from the operation's range (the official code's ``augment_list``:
there is no global magnitude), then a Cutout square of side u * 0.5 * width, u uniform, filled
with grey (125, 123, 114). Every draw comes from a generator seeded by (seed, epoch) apart from the
weak view's, for the whole global batch, so a batch is reproducible, the weak view is the same with
or without the strong one, and DDP slices see their part of the same draws
(:func:`strong_draws` then :func:`apply_strong`, as crops and flips in :mod:`.loader`).

These are our tensor versions of the PIL operations (pixel arithmetic on 0..255 with rounding,
nearest-neighbour geometry with black fill); they follow PIL's definitions but are not
bit-identical to it. Images with other than 3 channels skip the colour operation's mixing."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

#: (name, low, high): the official MLKD / FixMatch operation list and magnitude ranges
OPS: tuple[tuple[str, float, float], ...] = (
    ("autocontrast", 0, 1), ("brightness", 0.05, 0.95), ("color", 0.05, 0.95), ("contrast", 0.05, 0.95),
    ("equalize", 0, 1), ("identity", 0, 1), ("posterize", 4, 8), ("rotate", -30, 30), ("sharpness", 0.05, 0.95),
    ("shear_x", -0.3, 0.3), ("shear_y", -0.3, 0.3), ("solarize", 0, 256), ("translate_x", -0.3, 0.3), ("translate_y", -0.3, 0.3),
)
CUTOUT_FILL = (125.0, 123.0, 114.0)
STRONG_SALT = 0x5EED_57A0_0000  # keeps the strong view's seeds apart from the weak view's


def strong_generator(seed: int, epoch: int, device: torch.device) -> torch.Generator:
    """The strong view's own generator for (seed, epoch): separate from the weak view's, so turning the
    strong view on leaves every weak batch (order, crops, flips) exactly as it was."""
    generator = torch.Generator(device=device)
    generator.manual_seed((int(seed) * 1_000_003 + int(epoch)) ^ STRONG_SALT)
    return generator


def strong_draws(n: int, generator: torch.Generator, num_ops: int = 2) -> dict[str, Tensor]:
    """Every random choice of :func:`apply_strong` for ``n`` images: operation ids and magnitudes
    (``num_ops`` rows), Cutout size fraction and centre (fractions of the image)."""
    device = generator.device
    return {
        "ops": torch.randint(0, len(OPS), (num_ops, n), device=device, generator=generator),
        "levels": torch.rand(num_ops, n, device=device, generator=generator),
        "cutout": torch.rand(3, n, device=device, generator=generator),  # size fraction / 0.5, centre x, centre y
    }


def slice_draws(draws: dict[str, Tensor], rows) -> dict[str, Tensor]:
    """The draws of some images of the batch (a DDP slice): ``rows`` indexes the last dimension."""
    return {name: value[..., rows] for name, value in draws.items()}


def apply_strong(images: Tensor, draws: dict[str, Tensor]) -> Tensor:
    """RandAugment then Cutout on a uint8 (N, C, H, W) batch, with :func:`strong_draws`' draws; uint8 out."""
    x = images.float()
    for ops, levels in zip(draws["ops"], draws["levels"]):
        out = x.clone()
        for index, (name, low, high) in enumerate(OPS):
            chosen = (ops == index).nonzero().squeeze(1)
            if chosen.numel() == 0 or name == "identity":
                continue
            value = low + (high - low) * levels[chosen]
            out[chosen] = _OPERATIONS[name](x[chosen], value).round().clamp(0, 255)
        x = out
    return cutout(x, draws["cutout"]).to(torch.uint8)


# ------------------------------------------------------------------ pixel operations
def _blend(degenerate: Tensor, x: Tensor, factor: Tensor) -> Tensor:
    """PIL's ImageEnhance: degenerate + factor * (x - degenerate), per image."""
    return degenerate + factor.view(-1, 1, 1, 1) * (x - degenerate)


def _grey(x: Tensor) -> Tensor:
    """PIL's L conversion (ITU-R 601-2 luma), rounded; the image itself when not RGB."""
    if x.shape[1] != 3:
        return x
    return (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]).round()


def autocontrast(x: Tensor, value: Tensor) -> Tensor:
    """Each channel stretched so its darkest pixel becomes 0 and its brightest 255 (flat channels kept)."""
    low = x.amin(dim=(2, 3), keepdim=True)
    high = x.amax(dim=(2, 3), keepdim=True)
    scale = 255.0 / (high - low).clamp(min=1)
    return torch.where(high > low, (x - low) * scale, x)


def brightness(x: Tensor, value: Tensor) -> Tensor:
    return _blend(torch.zeros_like(x), x, value)


def color(x: Tensor, value: Tensor) -> Tensor:
    return _blend(_grey(x).expand_as(x), x, value)


def contrast(x: Tensor, value: Tensor) -> Tensor:
    mean = _grey(x).mean(dim=(1, 2, 3), keepdim=True).add(0.5).floor()
    return _blend(mean.expand_as(x), x, value)


def equalize(x: Tensor, value: Tensor) -> Tensor:
    """PIL's ImageOps.equalize per channel: lut[i] = (step // 2 + pixels below i) // step, where step is
    (pixels - pixels in the last occupied bin) // 255; a channel with step 0 is kept."""
    n, c, h, w = x.shape
    flat = x.reshape(n * c, h * w).long()
    hist = torch.zeros(n * c, 256, device=x.device, dtype=torch.long).scatter_add_(1, flat, torch.ones_like(flat))
    last = 255 - (hist.flip(1) > 0).long().argmax(dim=1)  # the highest occupied bin
    step = (h * w - hist.gather(1, last[:, None]).squeeze(1)) // 255
    below = hist.cumsum(dim=1) - hist
    lut = ((step[:, None] // 2 + below) // step.clamp(min=1)[:, None]).clamp(max=255)
    out = lut.gather(1, flat).float()
    return torch.where(step[:, None] > 0, out, flat.float()).reshape(n, c, h, w)


def posterize(x: Tensor, value: Tensor) -> Tensor:
    """Keep the int(value) high bits of every pixel."""
    dropped = (8 - value.long().clamp(1, 8)).view(-1, 1, 1, 1)
    return ((x.long() >> dropped) << dropped).float()


def sharpness(x: Tensor, value: Tensor) -> Tensor:
    """Blend with PIL's SMOOTH filter ([[1,1,1],[1,5,1],[1,1,1]] / 13, border pixels unfiltered)."""
    kernel = torch.tensor([[1.0, 1, 1], [1, 5, 1], [1, 1, 1]], device=x.device) / 13
    c = x.shape[1]
    smooth = F.conv2d(x, kernel.expand(c, 1, 3, 3), groups=c).round()
    degenerate = x.clone()
    degenerate[:, :, 1:-1, 1:-1] = smooth
    return _blend(degenerate, x, value)


def solarize(x: Tensor, value: Tensor) -> Tensor:
    """Invert every pixel at or above the threshold ``value``."""
    return torch.where(x >= value.view(-1, 1, 1, 1), 255 - x, x)


# ------------------------------------------------------------------ geometry (nearest, black fill)
def _affine(x: Tensor, coefficients: Tensor) -> Tensor:
    """PIL's Image.transform(AFFINE, (a, b, c, d, e, f), NEAREST) per image: the output pixel centred at
    (u, v) takes the input pixel containing (a u + b v + c, d u + e v + f); outside the image: 0."""
    n, ch, h, w = x.shape
    v, u = torch.meshgrid(torch.arange(h, device=x.device, dtype=x.dtype) + 0.5,
                          torch.arange(w, device=x.device, dtype=x.dtype) + 0.5, indexing="ij")
    a, b, c, d, e, f = (coefficients[:, i].view(-1, 1, 1) for i in range(6))
    src_x = (a * u + b * v + c).floor().long()
    src_y = (d * u + e * v + f).floor().long()
    inside = (src_x >= 0) & (src_x < w) & (src_y >= 0) & (src_y < h)
    index = (src_y.clamp(0, h - 1) * w + src_x.clamp(0, w - 1)).view(n, 1, h * w).expand(n, ch, h * w)
    out = x.reshape(n, ch, h * w).gather(2, index).view(n, ch, h, w)
    return out * inside[:, None].to(x.dtype)


def _coefficients(n: int, device, **entries: Tensor) -> Tensor:
    """(n, 6) affine coefficients, identity except the given entries (a..f)."""
    out = torch.tensor([1.0, 0, 0, 0, 1, 0], device=device).repeat(n, 1)
    for name, value in entries.items():
        out[:, "abcdef".index(name)] = value
    return out


def rotate(x: Tensor, value: Tensor) -> Tensor:
    """Counter-clockwise by ``value`` degrees about the centre (PIL's Image.rotate)."""
    h, w = x.shape[-2:]
    t = -value * math.pi / 180
    cos, sin = torch.cos(t), torch.sin(t)
    cx, cy = w / 2, h / 2
    return _affine(x, torch.stack([cos, sin, cx - cos * cx - sin * cy, -sin, cos, cy + sin * cx - cos * cy], dim=1))


def shear_x(x: Tensor, value: Tensor) -> Tensor:
    return _affine(x, _coefficients(x.shape[0], x.device, b=value))


def shear_y(x: Tensor, value: Tensor) -> Tensor:
    return _affine(x, _coefficients(x.shape[0], x.device, d=value))


def translate_x(x: Tensor, value: Tensor) -> Tensor:
    return _affine(x, _coefficients(x.shape[0], x.device, c=value * x.shape[-1]))


def translate_y(x: Tensor, value: Tensor) -> Tensor:
    return _affine(x, _coefficients(x.shape[0], x.device, f=value * x.shape[-2]))


def cutout(x: Tensor, draws: Tensor) -> Tensor:
    """The official Cutout: a square of side s = u * 0.5 * width with its corner at (centre - s / 2) clipped
    to the image, filled with grey; drawn like PIL's rectangle (both edges included); none when s = 0."""
    n, c, h, w = x.shape
    side = draws[0] * 0.5 * w
    x0 = (draws[1] * w - side / 2).clamp(min=0).floor()
    y0 = (draws[2] * h - side / 2).clamp(min=0).floor()
    x1, y1 = (x0 + side).clamp(max=w), (y0 + side).clamp(max=h)
    cols = torch.arange(w, device=x.device, dtype=x.dtype).view(1, 1, w)
    rows = torch.arange(h, device=x.device, dtype=x.dtype).view(1, h, 1)
    box = (cols >= x0.view(-1, 1, 1)) & (cols <= x1.view(-1, 1, 1)) & (rows >= y0.view(-1, 1, 1)) & (rows <= y1.view(-1, 1, 1))
    box = box & (side > 0).view(-1, 1, 1)
    fill = torch.tensor(CUTOUT_FILL if c == 3 else [sum(CUTOUT_FILL) / 3] * c, device=x.device, dtype=x.dtype).view(1, c, 1, 1)
    return torch.where(box[:, None], fill, x)


_OPERATIONS = {
    "autocontrast": autocontrast, "brightness": brightness, "color": color, "contrast": contrast, "equalize": equalize,
    "posterize": posterize, "rotate": rotate, "sharpness": sharpness, "shear_x": shear_x, "shear_y": shear_y,
    "solarize": solarize, "translate_x": translate_x, "translate_y": translate_y,
}
