"""The DALI data path: both views decoded and augmented by NVIDIA DALI, behind the views seam.

Same interface as loader.TwoViewSource / LabelledSource (`steps_per_epoch`, `epoch(epoch,
start_step=0)`), same epoch plan (loader.py's ssl_shard and labelled_shard), and
the same random numbers: every step's crop, flip, blur and jitter are drawn on the host by
views.sample_params from the torch path's seed (seed, epoch, step, rank) and fed to DALI as
per-sample inputs, so distributions match by construction, a resumed epoch replays exactly,
and on a CPU device both paths draw identical numbers (on CUDA the torch path draws on the
device's generator: same distributions, other numbers).

Where the images come from:
  * the decode-once uint8 cache (default): an external source slices the (N, S, S) array by
    the epoch order, one whole batch per call; DALI moves it to the device. The host's work
    per step is that row gather and the batch's random numbers; no host sync (outputs are
    ordered on torch's current stream);
  * image files (data too large to cache): the bytes are read on the host and decoded by
    fn.decoders.image (device "mixed": nvJPEG on the GPU for JPEG, other formats may be
    decoded on the host; "cpu" in CPU mode), then resized to the cache's side as the cache
    would have stored them.
Pass an (N, S, S) array for the first, a list of paths for the second. Device "cpu" runs
the whole pipeline on the CPU (device_id=None): that is how the tests run it. The GPU mode
uses the same graph with device-side ops; it has not yet run on a GPU (see tests/test_views.py
test_dali_gpu_matches_cpu_mode, which checks it against the CPU mode where DALI and CUDA are).

How each step of views.py is done here, and what differs:
  * crop + resize + flip: fn.resize with a relative ROI ((y, x) order); a flipped view swaps
    the ROI's x ends, which DALI reads right to left. Linear filter without antialiasing,
    matching torch's bilinear grid_sample (both alias a downscaling crop alike). Agreement on
    the CPU: ~1e-6 of the [0, 1] range.
  * blur: fn.gaussian_blur with the torch path's window (2 * blur_radius + 1) and the same
    reflect-101 border. DALI reads sigma 0 as "derive it from the window", so "no blur" is
    sigma 1e-3, whose off-centre weights are 0 in float32: the identity.
  * jitter: the same arithmetic, (x - mean) * b * c + mean * b, clamped.
  * normalise: fn.crop_mirror_normalize on three copies of the grey channel, writing NCHW or,
    for channels_last, NHWC (torch then sees it as NCHW with channels_last strides, no copy).
    DALI has no bfloat16: bf16 is converted in torch after the zero-copy (DLPack) handoff.
Unavoidable differences:
  * evaluation resize when downscaling (linear, antialiased): identical in the interior; in
    the outermost output pixels DALI replicates the edge while torch renormalises the
    truncated filter.
  * files: DALI's antialiased resize to the cache side agrees with PIL's (the cache) to one
    grey level inside the image, a few levels on the border. 16-bit files are scaled to 8
    bits over the full 16-bit range, where the cache stretches each file's min..max: cache
    such data instead.
"""
from __future__ import annotations

import os
from typing import Iterator, Sequence

import numpy as np
import torch

from .augment import IMAGENET_MEAN, IMAGENET_STD, AugmentConfig, ViewAugment
from .loader import labelled_shard, labelled_steps, ssl_shard, ssl_steps, step_seed
from .views import ViewParams, blur_radius, sample_params

try:  # the torch path must keep working where DALI is absent (e.g. the lent GPU machines)
    from nvidia.dali import Pipeline, fn, types
    from nvidia.dali import math as dmath
    from nvidia.dali.plugin.pytorch.torch_utils import to_torch_tensor
except (ImportError, OSError) as e:
    IMPORT_ERROR: Exception | None = e  # why DALI is unusable; None when it imported
else:
    IMPORT_ERROR = None

NO_BLUR = 1e-3  # sigma standing for "no blur" (DALI reads 0 as "derive from the window")


def require_dali() -> None:
    if IMPORT_ERROR is not None:
        raise SystemExit(f"the DALI data path needs NVIDIA DALI ({IMPORT_ERROR}); install it "
                         "with `pip install nvidia-dali-cuda120`, or use --backend torch")


def view_inputs(aug: ViewAugment) -> tuple[str, ...]:
    """The per-sample inputs a view's graph reads: blur's and jitter's only when they can happen."""
    return (("start", "end") + ("sigma",) * (aug.blur_p > 0)
            + ("brightness", "contrast") * (aug.jitter_p > 0))


def dali_args(p: ViewParams, aug: ViewAugment) -> list[np.ndarray]:
    """One view's random numbers as DALI per-sample inputs, in `view_inputs` order."""
    x0, y0, w, h = p.box.unbind(1)
    left, right = torch.where(p.flip, x0 + w, x0), torch.where(p.flip, x0, x0 + w)
    cols = {"start": torch.stack([y0, left], 1), "end": torch.stack([y0 + h, right], 1),
            "sigma": p.sigma.clamp(min=NO_BLUR), "brightness": p.brightness,
            "contrast": p.contrast}
    return [cols[k].float().contiguous().numpy() for k in view_inputs(aug)]


def view_graph(images, args: dict, aug: ViewAugment, size: int):
    """One augmented view of uint8 HWC (C = 1) images: grey floats in [0, 255], HWC.
    `args` maps the names of `view_inputs(aug)` to external-source nodes."""
    x = fn.resize(images, roi_start=args["start"], roi_end=args["end"], roi_relative=True,
                  size=[size, size], interp_type=types.INTERP_LINEAR, antialias=False,
                  dtype=types.FLOAT)
    if aug.blur_p > 0:
        x = fn.gaussian_blur(x, sigma=args["sigma"], window_size=2 * blur_radius(aug) + 1)
    if aug.jitter_p > 0:
        bright, contrast = args["brightness"], args["contrast"]
        if x.device == "gpu":  # arithmetic takes its per-sample factors on the data's device
            bright, contrast = bright.gpu(), contrast.gpu()
        mean = fn.reductions.mean(x)
        x = dmath.clamp((x - mean) * (bright * contrast) + mean * bright, 0.0, 255.0)
    return x


def split_inputs(nodes: list, augs) -> list[dict]:
    """Cut the external source's flat outputs into one `view_graph` argument dict per view."""
    out = []
    for aug in augs:
        names = view_inputs(aug)
        out.append(dict(zip(names, nodes[:len(names)])))
        nodes = nodes[len(names):]
    return out


def normalize_graph(x, dtype: torch.dtype, channels_last: bool):
    """Grey [0, 255] HWC -> three ImageNet-normalised channels, in the layout torch will read."""
    return fn.crop_mirror_normalize(
        fn.cat(x, x, x, axis_name="C"), mean=[255 * m for m in IMAGENET_MEAN],
        std=[255 * s for s in IMAGENET_STD], output_layout="HWC" if channels_last else "CHW",
        dtype=types.FLOAT16 if dtype == torch.float16 else types.FLOAT)


def to_torch(out, dtype: torch.dtype | None = None, channels_last: bool = False) -> torch.Tensor:
    """A DALI batch as a torch tensor without a copy (DLPack); NHWC becomes channels_last NCHW."""
    t = to_torch_tensor(out.as_tensor(), copy=False)
    if channels_last:
        t = t.permute(0, 3, 1, 2)
    return t if dtype is None or t.dtype == dtype else t.to(dtype)


class _DaliSource:
    """What both sources share: the input (cache rows or files), the epoch plan fed step by
    step to one external source, and the loop that runs the pipeline. One epoch iterator at
    a time: starting an epoch abandons the previous one.

    A source adds its epoch order (`_plan`), its per-step numbers (`_extras`, `n_extras` of
    them), its graph (`_graph`) and the torch tensors it yields (`_outputs`)."""

    def __init__(self, images, batch_size: int, seed: int, device, rank: int, world_size: int,
                 dtype: torch.dtype, channels_last: bool, cache_size: int):
        require_dali()
        is_files = isinstance(images, (list, tuple))
        self.files: Sequence[str] | None = [str(f) for f in images] if is_files else None
        self.images = None if is_files else images  # a memmap stays mapped: rows read per step
        self.n = len(images)
        self.batch, self.seed, self.rank, self.world = batch_size, seed, rank, world_size
        self.device, self.dtype, self.channels_last = torch.device(device), dtype, channels_last
        self.cache_size = cache_size
        self.gen = torch.Generator()  # the host generator every step's random numbers come from
        self._order, self._epoch, self._step, self._stop = np.zeros(0, np.int64), 0, 0, True
        self._pipe = None

    @property
    def _gpu(self) -> bool:
        return self.device.type == "cuda"

    def _feed(self):
        """The external source's callback: the next step's images and numbers, or the end."""
        step = self._step
        idx = self._order[step * self.batch:(step + 1) * self.batch]
        if self._stop or step >= self.steps_per_epoch or len(idx) == 0:
            raise StopIteration
        self._step += 1
        return (self._read(idx), *self._extras(idx, step))

    def _read(self, idx: np.ndarray):
        if self.files is not None:
            return [np.fromfile(self.files[i], dtype=np.uint8) for i in idx]
        return self.images[idx][..., None]  # (B, S, S, 1): the HWC layout DALI's ops expect

    def _decoded(self, images):
        """uint8 S x S HWC images on the pipeline's device, from cache rows or file bytes."""
        if self.files is None:
            return images.gpu() if self._gpu else images
        img = fn.decoders.image(images, device="mixed" if self._gpu else "cpu",
                                output_type=types.GRAY)
        # What the cache would have stored: every file resized to its side, antialiased.
        return fn.resize(img, size=[self.cache_size] * 2, interp_type=types.INTERP_LINEAR,
                         antialias=True)

    def _pipeline(self):
        if self._pipe is None:
            gpu = self._gpu
            device_id = (self.device.index if self.device.index is not None
                         else torch.cuda.current_device()) if gpu else None
            threads = max(1, len(os.sched_getaffinity(0)) // self.world)  # ranks share the host
            # exec_dynamic: output buffers are not recycled, so torch may hold them (zero copy).
            pipe = Pipeline(batch_size=self.batch, num_threads=threads, device_id=device_id,
                            prefetch_queue_depth=2, exec_dynamic=True)
            with pipe:
                images, *rest = fn.external_source(
                    source=self._feed, num_outputs=1 + self.n_extras, batch=True,
                    layout=["" if self.files else "HWC"] + [""] * self.n_extras)
                pipe.set_outputs(*self._graph(self._decoded(images), rest))
            pipe.build()
            self._pipe = pipe
        return self._pipe

    def _restart(self, epoch: int, start_step: int) -> None:
        """Drain what an abandoned epoch left prefetched (at most the queue depth), rewind
        DALI's end-of-data state, and point the feed at this epoch from `start_step`."""
        pipe = self._pipeline()
        self._stop = True
        while True:
            try:
                pipe.run()
            except StopIteration:
                break
        pipe.reset()
        self._order = self._plan(epoch).numpy()
        self._epoch, self._step, self._stop = epoch, start_step, False

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[tuple]:
        self._restart(epoch, start_step)
        # Outputs ordered on torch's stream: no host sync per step on a GPU.
        stream = torch.cuda.current_stream(self.device) if self._gpu else None
        while True:
            try:
                outs = self._pipe.run(stream)
            except StopIteration:
                return
            yield self._outputs(outs)


class DaliTwoViewSource(_DaliSource):
    """Pretraining: both augmented views of each batch, made by DALI (see TwoViewSource)."""

    def __init__(self, images: np.ndarray | Sequence[str], aug: AugmentConfig, batch_size: int,
                 seed: int, device, rank: int = 0, world_size: int = 1, dtype=torch.float32,
                 channels_last: bool = False, cache_size: int = 224):
        super().__init__(images, batch_size, seed, device, rank, world_size, dtype,
                         channels_last, cache_size)
        self.aug, self.n_extras = aug, sum(len(view_inputs(v)) for v in aug.views())
        self.steps_per_epoch = ssl_steps(self.n, batch_size, world_size)

    def _plan(self, epoch: int) -> torch.Tensor:
        return ssl_shard(self.n, self.seed, epoch, self.steps_per_epoch, self.batch, self.rank,
                         self.world)

    def _extras(self, idx, step):
        # As the torch path: seeded without the rank, drawn for the global batch, this rank's
        # rows kept, so N processes augment each image as one process would.
        self.gen.manual_seed(step_seed(self.seed, self._epoch, step, 0))
        return [a for view in self.aug.views()
                for a in dali_args(sample_params(len(idx) * self.world, view, self.gen, "cpu")
                                   .rows(self.rank, self.world), view)]

    def _graph(self, images, extras):
        views = self.aug.views()
        return [normalize_graph(view_graph(images, args, view, self.aug.size), self.dtype,
                                self.channels_last)
                for view, args in zip(views, split_inputs(extras, views))]

    def _outputs(self, outs):
        return tuple(to_torch(o, self.dtype, self.channels_last) for o in outs)


class DaliLabelledSource(_DaliSource):
    """Fine-tuning and evaluation: one view (augmented when training) and its labels, made by
    DALI (see LabelledSource). Without `train_aug`: the deterministic evaluation pass, every
    image in index order, resized whole to `size`."""

    def __init__(self, images: np.ndarray | Sequence[str], targets: np.ndarray, batch_size: int,
                 size: int, device, train_aug: ViewAugment | None = None, seed: int = 0,
                 rank: int = 0, world_size: int = 1, dtype=torch.float32,
                 channels_last: bool = False, cache_size: int = 224):
        super().__init__(images, batch_size, seed, device, rank, world_size, dtype,
                         channels_last, cache_size)
        self.targets = np.asarray(targets, dtype=np.int64)
        self.size, self.aug = size, train_aug
        # The labels, then the view's numbers.
        self.n_extras = 1 + (len(view_inputs(train_aug)) if train_aug is not None else 0)
        self.steps_per_epoch = labelled_steps(self.n, batch_size, world_size, train_aug is not None)

    def _plan(self, epoch: int) -> torch.Tensor:
        return labelled_shard(self.n, self.seed, epoch, self.rank, self.world,
                              self.aug is not None)

    def _extras(self, idx, step):
        labels = self.targets[idx]
        if self.aug is None:
            return [labels]
        self.gen.manual_seed(step_seed(self.seed, self._epoch, step, 0, 1))  # the global batch's
        p = sample_params(len(idx) * self.world, self.aug, self.gen, "cpu").rows(self.rank,
                                                                                  self.world)
        return [labels, *dali_args(p, self.aug)]

    def _graph(self, images, extras):
        labels, *args = extras
        if self.aug is None:
            x = fn.resize(images, size=[self.size] * 2, interp_type=types.INTERP_LINEAR,
                          antialias=True, dtype=types.FLOAT)
        else:
            x = view_graph(images, split_inputs(args, [self.aug])[0], self.aug, self.size)
        return [normalize_graph(x, self.dtype, self.channels_last),
                labels.gpu() if self._gpu else labels]

    def _outputs(self, outs):
        return to_torch(outs[0], self.dtype, self.channels_last), to_torch(outs[1])
