"""Upper bounds on every size, count and option, so bad input is refused before memory is allocated.

Each bound is checked where its value is defined: file headers in ``synomaly.io`` (before pixels are
decoded or decompressed), the fitted size in ``synomaly.data`` (before fitting), model-folder values
in the ``synomaly.config`` dataclasses, options in ``synomaly.cli``. docs/reliability.md lists them.
The reference data for "generous": the paper's UNet (channels up to 512, 5 levels, 128 px, T=1000,
98.6 M parameters), 155-slice 240x240 MRI volumes, 512x512 CT with up to 2000 slices.
"""

from __future__ import annotations

# Input files.
MAX_SIDE = 16384  # pixels per image side: 4x the largest radiographs (mammograms of about 4000 px)
MAX_SLICES = 10_000  # slices per input (pages, frames, files of a DICOM series): 5x a 2000-slice CT
# Pixels per input, as read and as padded to the model's fit (letterbox pads to a square of the
# longer side): 2 GiB as float32. A 2000-slice 512x512 CT has 524 M, a 155x240x240 MRI 8.9 M.
MAX_PIXELS = 2**29
# Bytes of one array once decompressed (an .npz member, a .nii.gz volume), read from its header
# before decompressing: a 2000-slice 512x512 CT stored as float32 is 2.0 GB.
MAX_DECOMPRESSED_BYTES = 2**31

# Model folders (config.json) and training.
MAX_IMAGE_SIZE = 2048  # model input side: 16x the paper's 128 px, 4x a 512x512 CT at full resolution
MAX_LEVELS = 8  # UNet resolution levels (the paper's has 5)
MAX_CHANNELS = 2048  # feature channels per level (the paper's widest is 512)
MAX_RES_BLOCKS = 16  # residual blocks per level (the paper's UNet has 2)
MAX_PARAMETERS = 1_000_000_000  # network parameters, counted before any weight is allocated: 10x the paper's
MAX_TIMESTEPS = 100_000  # diffusion steps T: 100x the paper's 1000; the schedule's tables stay below 10 MB
MAX_KERNEL = 1023  # blur kernel side, in pixels at the model size: half the largest model input
MAX_STAGES = 100  # detection stages per image (the paper stops within 5)
MAX_CHAIN_STEPS = MAX_TIMESTEPS  # reverse-chain evaluations: the full chain visits at most T timesteps
MAX_RESAMPLINGS = 1000  # AutoDDPM's evaluations per inpainting timestep (the authors use 4-5, RePaint 10)
MAX_AREA = MAX_IMAGE_SIZE**2  # pixel counts (detect.min_size, detect.min_area): a whole model input
MAX_BATCH_SIZE = 4096  # images per batch (detection or a training step and device)
MAX_STEPS = 100_000_000  # training steps (and the step intervals of checkpoints, previews, log rows)
MAX_WORKERS = 256  # data-loader worker processes
MAX_DEVICES = 1024  # devices per node, and nodes
MAX_SEED = 2**32 - 1  # seeds: the range NumPy and Lightning accept
MAX_GRID_POINTS = 100_000  # calibration grid points (the default grid has 144)
MAX_NOISE_LEVELS = 32  # simplex-noise octaves, pyramid-noise levels: each at least halves the feature size
MAX_NOISE_SCALE = MAX_IMAGE_SIZE  # noise sizes in pixels (Synomaly blob sigma, coarse-noise grid side)
