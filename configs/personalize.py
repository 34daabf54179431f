"""`uhap personalize`: a new person's avatar from a monocular video (and, optionally, a neutral scan).

    uhap personalize --prior runs/prior --encoder runs/encoder --audio-model runs/audio \
        --video data/subjects/id004/sequences/mono_00 --out avatars/id004 --config configs/personalize.py:tiny

The MonoEncoder gives each frame's code and head pose; only the identity conditioning is then fine-tuned on
the video: the decoder's bias maps (free, from the IdentityEncoder's on the scan, or on the average identity,
the training scans' mean, with the albedo read off the video), optionally the identity's shape, albedo map and
the last decoder layers; and, no part of the avatar, a correction of the encoder's head pose. Presets: tiny (CPU,
a few minutes), base (one GPU).
"""

import ml_collections

from data_pipelines import video_file
from uhap_jax.train.loop import default_config


def get_config(preset: str = "tiny") -> ml_collections.ConfigDict:
    if preset not in ("tiny", "base"):
        raise ValueError(f"configs/personalize.py: preset must be tiny or base, got {preset!r}")
    config = ml_collections.ConfigDict()
    config.preset = preset

    # The video: a capture-layout subject folder (every sequence of `camera`) or one sequence folder.
    config.camera = ""  # the monocular camera's serial; "" = the sequences' only camera
    config.sequences = ()  # sequence names to use; empty = every sequence that camera saw
    # Frames used, spread evenly over the video: ~1 MB each at 512^2 (image and mask in memory), so 300 fit a
    # laptop; `uhap personalize` refuses more than 1000 unless UHAP_MAX_FRAMES is raised.
    config.max_frames = 300
    # A plain video file (mp4/mov, no calibration): its frames and intrinsics (data_pipelines/video_file.py).
    config.video = ml_collections.ConfigDict()
    config.video.fps = 0.0  # resample the file to this frame rate; 0 = keep the file's
    config.video.max_side = 512  # frames shrunk so that their longer side is at most this (pixels)
    config.video.fov_deg = video_file.DEFAULT_FOV_DEG  # across the longer side, when the file has no focal length
    config.video.calibration = ""  # or a user calibration (capture-layout camera_params.json, or a 3x3 matrix)
    config.video.smooth_frames = 7  # running median of the head's detections over this many frames
    config.video.min_presence = 0.5  # frames where the localiser scores a head below this are not used
    # Passes that move the virtual cameras to where the encoder puts the head (its crops framed as in training):
    # the localiser's size was 8-42% off on the demo's held-out phone clips (docs/benchmarks.md, session 20).
    config.video.recentre = 2
    config.use_scan = True  # start from <subject>/neutral_scan when there is one
    config.scan = ""  # or a neutral-scan folder (mesh.ply / mesh.obj) elsewhere
    config.workdir = ""  # checkpoints and metrics of the fine-tune; "" = <out>.work beside the avatar
    config.image_size = 512  # the avatar's default render size (square)

    config.albedo = ml_collections.ConfigDict()  # without a scan: albedo read off the video
    config.albedo.frames = 25  # frames projected (spread over the video: a turning head shows each side in some)
    config.albedo.depth_tolerance = 0.005  # metres behind the rendered surface a texel may be and count as seen
    config.albedo.min_seen = 0.25  # share of those frames that must show a texel for its colour to be read
    # With the prior's albedo population (training identities): the MAP albedo given the seen texels, each
    # seen texel's colour having this variance when seen in every frame.
    config.albedo.population_noise = 0.01
    # A per-region colour offset beyond the population (a hair colour no training identity had), its prior
    # variance in units of the population's own variance in that region.
    config.albedo.region_variance = 0.3

    config.tune = ml_collections.ConfigDict()
    config.tune.bias_maps = True  # the decoder's bias maps, free, from the IdentityEncoder's for the start's maps
    # The albedo UV map, texel by texel. Off: fitted to one view it paints what that view sees onto texels that
    # other views see differently (-1.3 dB held-out-view PSNR on the tiny data); the video's albedo stays.
    config.tune.albedo = False
    # Its geometry: a smooth deformation across the camera's line of sight (per-axis scale, displacements on a
    # coarse grid). Off: the fit bends it to absorb the encoder's code and pose errors. Held-out-view PSNR on the
    # tiny data: -0.5 dB (scale only) and -1.6 dB (grid) on a near-frontal clip; on the head-turning clip +0.04 and
    # -0.25 dB in two runs, and +0.8 dB given the true head pose (the encoder's is ~4 degrees off).
    config.tune.shape = False
    config.tune.shape_grid = 4  # control points per axis of that grid (0: the scale only)
    # Where the person's mouth sits on their face: one shift of the Gaussians about the lips (30 mm rigid, 15 mm
    # falloff), across the camera's line of sight. The average identity that the fit starts from puts the lips
    # 5-8 mm from a new person's, which is the whole of the demo's LVE gap. It needs the encoder's head pose: on
    # the 64² demo with its encoder at 5.2 degrees off on the phone clips, LVE 87.2 -> 65.8 mm²
    # (one test person's lips 117.8 -> 56.0, the other's, mostly off in depth, 56.6 -> 75.6); with the encoder
    # before it (7.5 degrees) only 88.2 -> 84.6 (docs/benchmarks.md, issue 17, session 27). Untried at 512².
    config.tune.mouth = True
    config.tune.decoder_layers = 0  # 1: the output layer and the colour MLP; k: and the last k - 1 UpBlocks
    # Not identity (not stored): a correction of the encoder's head pose, "video" (one for all frames), "frame"
    # (per frame) or "none". On the demo's 64² phone clips the encoder's pose is off by 12-13 degrees rms on the
    # held-out identities (8-16 on training ones; docs/benchmarks.md, issue 17, session 15).
    config.tune.pose = "frame"

    config.data = ml_collections.ConfigDict()
    config.data.batch_size = 8
    config.data.encode_batch_size = 16  # frames per MonoEncoder call
    config.data.num_threads = 0
    config.data.prefetch = 2

    config.loss = ml_collections.ConfigDict()
    config.loss.l1 = 1.0
    config.loss.ssim = 0.2
    config.loss.silhouette = 0.3  # L1 of rendered alpha against the mask (when the video has masks)
    config.loss.background_weight = 0.5
    config.loss.bias_anchor = 1e-3  # x mean squared residual of the bias maps
    config.loss.albedo_anchor = 1e-2  # x mean squared change of the albedo
    config.loss.shape_anchor = 1e-3  # x mean squared grid displacement (units of offset_scale) and log-scale
    config.loss.mouth_anchor = 1e-3  # x mean squared mouth shift (units of 1 cm)
    config.loss.pose_anchor = 1e-3  # x mean squared pose correction (units of 0.1 rad and 1 cm)
    config.loss.offset = 1e3  # x metres^2 of decoded offset, as in the prior
    config.loss.scale = 1e2
    config.loss.max_scale = 0.01

    config.optimizer = ml_collections.ConfigDict()
    config.optimizer.learning_rate = 5e-3
    config.optimizer.warmup_steps = 10
    config.optimizer.grad_clip = 1.0

    config.render = ml_collections.ConfigDict()
    config.render.capacity_headroom = 1.5

    config.eval = ml_collections.ConfigDict()  # `heldout_quality`: held-out-view PSNR of a held-out identity
    config.eval.num_frames = 16
    config.eval.batch_size = 8

    config.train = default_config()
    config.train.steps = 150
    config.train.log_every = 25
    config.train.checkpoint_every = 50
    config.train.mesh.fsdp = 1
    config.train.sharding.rules = ((r"^rest/", "replicate"),)

    if preset == "base":
        config.data.batch_size = 16
        config.data.num_threads = 4
        config.data.prefetch = 8
        config.albedo.frames = 32
        config.eval.num_frames = 64
        config.eval.batch_size = 16
        config.optimizer.learning_rate = 2e-3
        config.optimizer.warmup_steps = 100
        config.train.steps = 3000
        config.train.log_every = 100
        config.train.checkpoint_every = 500
    return config
