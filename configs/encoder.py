"""`uhap train encoder`: the monocular encoder, one view -> the prior's expression code and the head pose.

    uhap train encoder --config configs/encoder.py:tiny --workdir runs/encoder --config.prior_workdir=runs/prior

Presets: tiny (CPU/CI: a small CNN on 64² crops, 1-2 minutes), base (one GPU). The prior is read from
`prior_workdir` (its config.json and latest checkpoint) and stays frozen.
"""

import ml_collections

from uhap_jax.models.head_localiser import default_localiser_config
from uhap_jax.models.mono_encoder import default_model_config
from uhap_jax.train.loop import default_config


def get_config(preset: str = "tiny") -> ml_collections.ConfigDict:
    if preset not in ("tiny", "base"):
        raise ValueError(f"configs/encoder.py: preset must be tiny or base, got {preset!r}")
    config = ml_collections.ConfigDict()
    config.preset = preset
    config.prior_workdir = ""  # a `uhap train prior` workdir: config.json and checkpoints/

    # Where the captures are; empty fields take the prior's (the data it was trained on).
    config.data = ml_collections.ConfigDict()
    config.data.root = ""
    config.data.synth_preset = ""
    config.data.cache_dir = ""
    config.data.batch_size = 16  # frames per global batch, one random held-in view each
    config.data.photo_frames = 4  # of them, rendered through the frozen prior for the photometric loss
    config.data.turned_frames = 4  # of them, rendered by the prior with the head turned (`turns`), as examples
    # Frames per step from the training identities' monocular sequences that carry a true head pose (the synthetic
    # phone clips; a rig-only capture has none): their pose is learned too (`loss.phone_pose`), and the head
    # localiser learns from them too, so both see the phone's lens, blur and exposure, not only the rig's. Rounded
    # up to a multiple of the devices. On the demo's held-out identities' phone clips (docs/benchmarks.md, issue 17,
    # session 20) the rotation error falls from 9.9 to 7.7 degrees through the calibrated clip and from 28.0 to
    # 7.3 as a plain video file; 0: rig views only.
    config.data.phone_frames = 8
    # Of those, the share seen as a plain video file gives them (`uhap personalize --video`): through a virtual
    # camera placed where the head was found, with a head localiser's errors (up to centre_jitter of the crop's side,
    # exp(+-size_jitter) in size); the rest through the clip's calibrated camera (a capture-layout folder).
    config.data.phone_video = ml_collections.ConfigDict()
    config.data.phone_video.share = 0.5
    config.data.phone_video.centre_jitter = 0.1
    config.data.phone_video.size_jitter = 0.35
    config.data.code_batch_size = 16  # frames per call when the prior encodes the targets (once, cached)
    config.data.num_threads = 2
    config.data.prefetch = 4

    config.model = default_model_config()
    # The head localiser (a video file's frames have no calibration to say where the head is), trained beside it.
    config.localiser = default_localiser_config()

    # Head turns added to those frames: the rig's cameras are tens of degrees apart, a phone video's head turns
    # fall between them.
    config.turns = ml_collections.ConfigDict()
    config.turns.max_yaw_deg = 40.0
    config.turns.max_pitch_deg = 10.0

    # Colour jitter of every image the encoder (and its localiser) sees in training: a gain per channel and a
    # contrast, log-normal with these stds (`encoder_stage.colour_jitter`; 0: none). Six training identities
    # otherwise teach it cues of who it looks at. On the demo's held-out identities' phone clips the head rotation
    # error went 7.47 -> 5.23 degrees with one training seed and 6.22 -> 7.24 with another (mean 6.85 -> 6.24; on
    # their rig views 12.8 -> 8.9 and 7.3 -> 8.4): within seed noise, not a proven gain (docs/benchmarks.md, issue
    # 17, session 27).
    config.augment = ml_collections.ConfigDict()
    config.augment.gain = 0.2
    config.augment.contrast = 0.2

    config.loss = ml_collections.ConfigDict()
    config.loss.code = 1.0  # MSE of z, over the variance of the training codes
    # Pose weights: the pose is read well at 0.01 (mono clip's turns ~4 degrees off); at 0.05 the pose drowned the
    # codes (held-out code MSE 0.63 against the mean code's 0.65, 0.47 at 0.01; tiny data, 500 steps).
    config.loss.rotation = 0.01  # x degrees^2 of rotation-vector error, up to rotation_linear_deg
    # Beyond it the error counts linearly: the pose starts as a frontal view, tens of degrees off for the rig's
    # side cameras, and squared errors there would drown the code's gradient.
    config.loss.rotation_linear_deg = 3.0
    config.loss.translation = 0.01  # x mm^2
    config.loss.photometric = 1.0  # masked L1 of the view rendered from the predicted code and pose
    config.loss.turned = 1.0  # the code, rotation and translation terms on the turned renders
    config.loss.phone_pose = 1.0  # the rotation and translation terms on the phone-clip frames (`data.phone_frames`)
    config.loss.photometric_fraction = 0.1  # of the steps, drawn at random, that render (1: every step)
    config.loss.background_weight = 0.5  # L1 weight of background pixels relative to foreground ones

    config.optimizer = ml_collections.ConfigDict()
    config.optimizer.learning_rate = 2e-3
    config.optimizer.warmup_steps = 20
    config.optimizer.grad_clip = 1.0

    config.render = ml_collections.ConfigDict()
    config.render.capacity_headroom = 1.5  # x the pairs the probe frames need

    config.eval = ml_collections.ConfigDict()
    config.eval.every = 500  # steps; code MSE, pose error and photometric PSNR on held-out sentences
    config.eval.num_frames = 16  # per evaluated split
    config.eval.batch_size = 8

    config.train = default_config()
    config.train.steps = 500
    config.train.log_every = 50
    config.train.checkpoint_every = 250
    config.train.mesh.fsdp = 1
    config.train.sharding.rules = ((r"^rest/", "replicate"),)  # the frozen prior and template constants

    if preset == "base":
        config.data.batch_size = 64
        config.data.photo_frames = 8
        config.loss.photometric_fraction = 1.0
        config.data.num_threads = 8
        config.data.prefetch = 16
        config.model.crop_size = 128
        config.model.channels = (32, 64, 128, 128, 256)
        config.model.hidden = 512
        config.optimizer.learning_rate = 5e-4
        config.optimizer.warmup_steps = 500
        config.eval.every = 2000
        config.eval.num_frames = 64
        config.eval.batch_size = 16
        config.train.steps = 30_000
        config.train.log_every = 100
        config.train.checkpoint_every = 2000
    return config
