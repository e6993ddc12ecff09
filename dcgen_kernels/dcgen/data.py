"""Data plumbing for the DC-Gen CLI: images, autoencoder latents, a latent cache, local-only model loading.

* `sample_images` returns RGB uint8 images shipped inside scikit-image's wheel (no network), for smoke runs.
* `load_image_folder` reads a folder of images with PIL, center-crops to a square and resizes, giving a
  (N, 3, size, size) float tensor in [-1, 1] (the range diffusers autoencoders expect).
* `encode_latents` encodes such a tensor with a diffusers ``AutoencoderKL`` (base FLUX / SD VAE) or
  ``AutoencoderDC`` (DC-AE), deterministic and scaled as the diffusers pipelines scale latents before the
  transformer sees them (see its docstring).
* `save_latent_cache` / `load_latent_cache` keep both latent sets of the same images in one safetensors file,
  with JSON metadata stored in the safetensors header.
* `load_local_model` loads ``from_pretrained`` strictly from a local directory; nothing downloads at run time.

Errors about the user's inputs (missing folders, unreadable images, malformed caches) raise `DataError`
(a ValueError) or FileNotFoundError with a message naming the offending path.
"""

from __future__ import annotations

import json
import os
import warnings
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

__all__ = ["DataError", "SAMPLE_IMAGE_NAMES", "IMAGE_EXTENSIONS", "sample_images", "images_to_tensor",
           "image_files", "load_image_folder", "encode_latents", "save_latent_cache", "load_latent_cache",
           "load_local_model"]

SAMPLE_IMAGE_NAMES = ("astronaut", "coffee", "chelsea", "rocket", "cat", "immunohistochemistry")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".gif", ".ppm")
_META_KEY = "dcgen"


class DataError(ValueError):
    """A problem with user-provided data (images, caches, text embeddings)."""


# ----------------------------------------------------------------------------------------------- images
def read_json(path: str) -> dict:
    """The JSON object in the file `path` (a model's config.json, a pipeline's model_index.json); DataError naming
    the file when it holds something else."""
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(value, dict):
        raise DataError(f"{path} must hold a JSON object, got {type(value).__name__}")
    return value


def _to_rgb_uint8(image: np.ndarray, name: str) -> np.ndarray:
    image = np.asarray(image)
    if image.size == 0:
        raise DataError(f"image {name!r} is empty (shape {image.shape})")
    if image.dtype != np.uint8:
        if not np.issubdtype(image.dtype, np.floating):
            raise DataError(f"image {name!r} has unsupported dtype {image.dtype}")
        # skimage's float images live in [0, 1], overshoots of resampling are clipped; values far outside follow
        # another convention (0-255, [-1, 1]) that clipping would turn white or black
        low, high = float(np.min(image)), float(np.max(image))  # NaN propagates: refused below
        if not (low >= -0.5 and high <= 1.5):
            raise DataError(f"image {name!r} is {image.dtype} with values in [{low:g}, {high:g}]; float images "
                            f"must be in [0, 1] (or give uint8)")
        image = (np.clip(image, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    if image.ndim == 2:
        image = np.stack([image] * 3, axis=-1)
    elif image.ndim == 3 and image.shape[2] == 1:
        image = np.repeat(image, 3, axis=2)
    elif image.ndim == 3 and image.shape[2] == 4:
        image = image[..., :3]  # drop alpha
    if image.ndim != 3 or image.shape[2] != 3:
        raise DataError(f"image {name!r} has shape {image.shape}, expected (H, W), (H, W, 3) or (H, W, 4)")
    return np.ascontiguousarray(image)


def sample_images(names: Optional[Sequence[str]] = None) -> List[np.ndarray]:
    """RGB uint8 (H, W, 3) images bundled in scikit-image's wheel (default: all of `SAMPLE_IMAGE_NAMES`).

    Only images that load without network access are returned when `names` is None (skimage fetches some
    data sets on demand; those are skipped). Explicitly requested names that cannot be loaded raise DataError.
    Gray images are repeated to RGB, RGBA images lose their alpha channel.
    """
    import skimage.data

    explicit = names is not None
    names = SAMPLE_IMAGE_NAMES if names is None else tuple(names)
    out = []
    for name in names:
        loader = getattr(skimage.data, name, None)
        if loader is None or not callable(loader):
            if explicit:
                raise DataError(f"scikit-image has no sample image {name!r}; known: {', '.join(SAMPLE_IMAGE_NAMES)}")
            continue
        try:
            image = loader()
        except Exception as e:  # skimage raises various errors for data it would have to download
            if explicit:
                raise DataError(f"scikit-image sample image {name!r} could not be loaded offline: {e}") from e
            continue
        out.append(_to_rgb_uint8(image, name))
    if not out:
        raise DataError("no scikit-image sample image could be loaded")
    return out


def _center_crop_resize(image, size: int):
    from PIL import Image

    w, h = image.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    image = image.crop((left, top, left + side, top + side))
    return image.resize((size, size), resample=Image.BICUBIC)


def images_to_tensor(images: Sequence[np.ndarray], size: int) -> torch.Tensor:
    """RGB uint8 (H, W, 3) arrays -> (N, 3, size, size) float32 in [-1, 1], center-cropped and resized."""
    from PIL import Image

    if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
        raise ValueError(f"size must be a positive int, got {size!r}")
    if len(images) == 0:
        raise DataError("no images given")
    arrays = [np.asarray(_center_crop_resize(Image.fromarray(_to_rgb_uint8(im, f"#{i}")), size))
              for i, im in enumerate(images)]
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float()
    return x / 127.5 - 1.0


def image_files(path: str) -> List[str]:
    """The names of the image files (by extension, see `IMAGE_EXTENSIONS`) directly in `path`, sorted: the order
    `load_image_folder` reads them in. FileNotFoundError for a missing folder, DataError for one without images."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"image folder {path!r} does not exist or is not a directory")
    files = sorted(f for f in os.listdir(path)
                   if f.lower().endswith(IMAGE_EXTENSIONS) and os.path.isfile(os.path.join(path, f)))
    if not files:
        raise DataError(f"image folder {path!r} holds no image files (looked for {', '.join(IMAGE_EXTENSIONS)})")
    return files


def _skipped_entries(path: str, files: List[str]) -> List[str]:
    """The entries of `path` that `image_files` leaves out, hidden ones (dot files) aside."""
    kept = set(files)
    return sorted(f for f in os.listdir(path) if f not in kept and not f.startswith("."))


def _file_to_rgb_uint8(im, full: str) -> np.ndarray:
    """The RGB uint8 array a PIL image shows: EXIF orientation applied (as image viewers and diffusers' load_image
    do), transparency composited over white (what shows through is otherwise whatever colour the file stores
    there), 16-bit gray scaled to 8 bits (PIL's convert would clip it at 255); 32-bit int / float samples, whose
    range a file does not fix, are refused."""
    from PIL import Image, ImageOps

    im = ImageOps.exif_transpose(im)
    if im.mode.startswith("I;16"):
        return _to_rgb_uint8(np.asarray(im).astype(np.float64) / 65535.0, full)
    if im.mode in ("I", "F"):
        raise DataError(f"image {full!r} has mode {im.mode} (32-bit {'int' if im.mode == 'I' else 'float'} samples, "
                        f"whose range the file does not fix): convert it to an 8- or 16-bit image first")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info:
        rgba = im.convert("RGBA")
        im = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    return np.asarray(im.convert("RGB"))


def load_image_folder(path: str, size: int) -> torch.Tensor:
    """Every image file of `image_files(path)`, in that order, as a (N, 3, size, size) float32 tensor in [-1, 1]:
    as displayed (EXIF orientation applied, transparency over white, 16-bit gray scaled), center-cropped to a square,
    resized (bicubic). A warning names the entries left out (subfolders, other extensions, broken links) and the
    multi-frame files (animations, TIFF stacks), of which the first frame is read.

    Raises FileNotFoundError for a missing folder, DataError for a folder without images or an unreadable file.
    """
    from PIL import Image, UnidentifiedImageError

    files = image_files(path)
    skipped = _skipped_entries(path, files)
    if skipped:
        warnings.warn(f"{path}: {len(skipped)} entries are not image files and are left out (subfolders are not "
                      f"read; extensions read: {', '.join(IMAGE_EXTENSIONS)}): {', '.join(skipped[:5])}"
                      f"{' ...' if len(skipped) > 5 else ''}", UserWarning, stacklevel=2)
    arrays, multi_frame = [], []
    for f in files:
        full = os.path.join(path, f)
        try:
            with Image.open(full) as im:
                im.load()
                frames = getattr(im, "n_frames", 1)
                arrays.append(_file_to_rgb_uint8(im, full))
        except DataError:
            raise
        except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
            raise DataError(f"could not read image {full!r}: {e}") from e
        if frames > 1:
            multi_frame.append(f)
    if multi_frame:
        warnings.warn(f"{path}: only the first frame of {len(multi_frame)} multi-frame images is read: "
                      f"{', '.join(multi_frame[:5])}{' ...' if len(multi_frame) > 5 else ''}", UserWarning,
                      stacklevel=2)
    return images_to_tensor(arrays, size)


# ----------------------------------------------------------------------------------------------- latents
def encode_latents(images: torch.Tensor, autoencoder: torch.nn.Module, batch_size: int = 8) -> torch.Tensor:
    """Encode (N, 3, H, W) images in [-1, 1] to the latents a diffusers transformer is trained on.

    * ``AutoencoderKL``: the posterior's mode (= its mean, a diagonal Gaussian), not a sample, so the cache is
      deterministic; then ``(z - shift_factor) * scaling_factor`` when the config has a shift_factor (FLUX,
      SD3), else ``z * scaling_factor`` (SD) -- as the diffusers pipelines prepare latents for training.
    * ``AutoencoderDC``: ``encode(x).latent * scaling_factor`` (as SanaPipeline).

    Runs under no_grad with the model in eval mode, in the model's dtype / device, in chunks of `batch_size`;
    returns float32 latents on the CPU.
    """
    from diffusers import AutoencoderDC, AutoencoderKL

    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be a (N, 3, H, W) tensor, got "
                         f"{tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if isinstance(autoencoder, AutoencoderKL):
        kind = "kl"
    elif isinstance(autoencoder, AutoencoderDC):
        kind = "dc"
    else:
        raise TypeError(f"encode_latents supports diffusers AutoencoderKL and AutoencoderDC, got "
                        f"{type(autoencoder).__name__}")
    config = autoencoder.config
    factor = 2 ** (len(config.block_out_channels) - 1) if kind == "kl" else autoencoder.spatial_compression_ratio
    if images.shape[2] % factor or images.shape[3] % factor:
        raise ValueError(f"images height and width must be multiples of {type(autoencoder).__name__}'s downsampling "
                         f"factor {factor}, got {images.shape[2]}x{images.shape[3]}")
    scale = getattr(config, "scaling_factor", None)
    scale = 1.0 if scale is None else float(scale)
    shift = getattr(config, "shift_factor", None) if kind == "kl" else None
    param = next(autoencoder.parameters())
    autoencoder.eval()
    out = []
    with torch.no_grad():
        for chunk in images.split(batch_size):
            x = chunk.to(device=param.device, dtype=param.dtype)
            if kind == "kl":
                z = autoencoder.encode(x).latent_dist.mode()
                if shift is not None:
                    z = z - float(shift)
            else:
                z = autoencoder.encode(x).latent
            out.append((z * scale).float().cpu())
    return torch.cat(out)


def save_latent_cache(path: str, base_latents: torch.Tensor, dc_latents: torch.Tensor,
                      meta: Optional[Dict] = None) -> None:
    """Write both latent sets of the same N images to one safetensors file; `meta` (JSON-serialisable) goes
    into the safetensors metadata under the key ``"dcgen"``."""
    from safetensors.torch import save_file

    for name, t in (("base_latents", base_latents), ("dc_latents", dc_latents)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"{name} must be a (N, C, h, w) tensor")
    if base_latents.shape[0] != dc_latents.shape[0]:
        raise ValueError(f"base_latents and dc_latents must hold the same images, got {base_latents.shape[0]} "
                         f"and {dc_latents.shape[0]}")
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    save_file({"base_latents": base_latents.detach().cpu().contiguous(),
               "dc_latents": dc_latents.detach().cpu().contiguous()},
              path, metadata={_META_KEY: json.dumps(meta or {}, sort_keys=True)})


def load_latent_cache(path: str) -> Tuple[torch.Tensor, torch.Tensor, Dict]:
    """Read a file written by `save_latent_cache`: ``(base_latents, dc_latents, meta)``."""
    from safetensors import safe_open

    if not os.path.isfile(path):
        raise FileNotFoundError(f"latent cache {path!r} does not exist (write one with the `encode` command)")
    try:
        with safe_open(path, framework="pt") as f:
            keys = set(f.keys())
            missing = {"base_latents", "dc_latents"} - keys
            if missing:
                raise DataError(f"latent cache {path!r} lacks {sorted(missing)}; was it written by `encode`?")
            base, dc = f.get_tensor("base_latents"), f.get_tensor("dc_latents")
            meta = json.loads((f.metadata() or {}).get(_META_KEY, "{}"))
    except DataError:
        raise
    except Exception as e:  # safetensors raises its own error types for corrupt files
        raise DataError(f"could not read latent cache {path!r}: {e}") from e
    return base, dc, meta


# ----------------------------------------------------------------------------------------------- models
def load_local_model(cls, path: str):
    """``cls.from_pretrained(path, local_files_only=True)`` with a clear error if `path` is not a local model.

    `path` must be a directory written by ``save_pretrained`` (``config.json`` plus weights), e.g. the
    ``transformer/`` or ``vae/`` subfolder of a downloaded diffusers checkpoint. Nothing is downloaded.
    """
    what = getattr(cls, "__name__", str(cls))
    if not path or not os.path.isdir(path):
        raise FileNotFoundError(f"{what}: local model directory {path!r} does not exist; provide a directory "
                                f"written by save_pretrained (config.json + weights), e.g. the transformer/ or "
                                f"vae/ subfolder of a downloaded diffusers checkpoint (nothing is downloaded)")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"{what}: {path!r} has no config.json; provide a directory written by "
                                f"save_pretrained (config.json + weights), e.g. the transformer/ or vae/ "
                                f"subfolder of a downloaded diffusers checkpoint (nothing is downloaded)")
    try:
        return cls.from_pretrained(path, local_files_only=True)
    except OSError as e:
        raise FileNotFoundError(f"{what}: could not load a model from local directory {path!r}: {e}") from e
