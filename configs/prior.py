"""`uhap train prior`: the universal prior (UHAP) on multi-view frames with neutral scans.

Presets: tiny (CPU/CI: UV 32^2 on the synthetic tiny dataset, minutes), base (one GPU: UV 256^2),
large (a cluster: UV 512^2, FSDP over the `fsdp` mesh axis).
"""

import ml_collections

from uhap_jax.train.loop import default_config


def get_config(preset: str = "tiny") -> ml_collections.ConfigDict:
    if preset not in ("tiny", "base", "large"):
        raise ValueError(f"configs/prior.py: preset must be tiny, base or large, got {preset!r}")
    config = ml_collections.ConfigDict()
    config.preset = preset

    # An empty root makes (once) and caches the synthetic dataset of `synth_preset` under cache_dir
    # (default ~/.cache/uhap); records go to <cache_dir>/records/<hash of the root>.
    config.data = ml_collections.ConfigDict()
    config.data.root = ""
    config.data.synth_preset = "tiny"
    config.data.cache_dir = ""
    config.data.batch_size = 2  # frames per global batch
    config.data.num_views = 4  # held-in views per frame: the expression encoder sees them, the loss renders them
    config.data.num_threads = 2
    config.data.prefetch = 4
    # Views the expression encoder sees, drawn apart from the num_views that the loss renders: were they the
    # same, the code could learn which cameras the loss looks through and the decoder could fit those cameras
    # alone (held-out-camera PSNR then falls while the training PSNR rises). 0: it sees the rendered views;
    # -1: as many as num_views.
    config.data.encoder_views = -1
    config.data.decoded = False  # decode the records' PNGs once into a uint8 cache (frame_cache); ~1 MiB/image at 512^2
    config.data.decode_workers = 0  # processes that build that cache (0: one per core)
    config.data.device_prefetch = 2  # global batches kept ready on the devices by a thread
    # grain worker processes that build the batches (0: threads of the training process). On one H200 threads
    # keep up (end to end 98% of the step alone); workers were slower (34% against the threads' 50%, measured
    # before the put_batch fix; docs/benchmarks.md, issue 19).
    config.data.num_workers = 0

    config.model = ml_collections.ConfigDict()
    config.model.template_resolution = 48  # procedural template head: must be the scans' topology
    config.model.uv_resolution = 32
    config.model.z_dim = 128
    # > 0: the expression posterior's mean is bounded to +-code_bound (a tanh) and its variance to at most the
    # prior's (a softplus); 0: unbounded (every preset: a bound slows the held-out rise, issue 19 session 22).
    config.model.code_bound = 0.0
    config.model.decoder_base_resolution = 4
    config.model.decoder_channels = (64, 32, 16)  # one UpBlock each: base * 2**len = uv_resolution
    config.model.expression_channels = (16, 32, 64, 64)
    config.model.expression_hidden = 256
    config.model.color_features = 8
    config.model.color_hidden = 32
    config.model.offset_scale = 0.01  # metres per unit of decoded offset and of the scan-offset input
    config.model.max_scale_ratio = 4.0  # scales stay within [1/r, r] x the texel's base scale
    config.model.thickness = 0.3  # normal-axis scale relative to the in-plane scale
    # Metres: the scalp's Gaussians start this far out along the normal, a shell for hair that stands off the skull
    # (issue 19: the scalp otherwise reaches the hair's silhouette only by growing). When > 0 the scan and tracked
    # terms leave the scalp out (scanners and trackers see the skull). 0: on the skull.
    config.model.hair_shell = 0.0
    # Colour that depends on the view ray (an MLP of it and the Gaussian's features); False: one colour per
    # Gaussian and frame, whatever the camera (issue 19: the rig has only its training cameras' directions).
    config.model.view_dependent = True
    config.model.opacity_init_logit = 3.0
    # Frames whose tracked mesh the expression encoder does not see during training (it sees it where the
    # capture has one; see ExpressionEncoder): the image-only path learns from these.
    config.model.geometry_dropout = 0.5
    # Learned colour gains of the capture's cameras (by their index in a record, at most this many), applied to
    # the training renders only; 0: none. Held-out cameras are rendered without one (their gain is unknown).
    config.model.camera_gains = 64  # issue 18's rig: gains 0.85-1.15 and white balance per camera; NeRSemble: 16

    config.loss = ml_collections.ConfigDict()
    config.loss.l1 = 1.0
    config.loss.ssim = 0.2
    config.loss.silhouette = 0.3  # L1 of rendered alpha against the mask
    config.loss.background_weight = 0.5  # L1 weight of background pixels relative to foreground ones
    config.loss.lpips = 0.0
    config.loss.lpips_weights = ""  # a local LPIPS-VGG state dict (.safetensors/.npz); never downloaded
    config.loss.kl = 1e-4
    # Spread of each Gaussian's view-dependent colour over the batch's cameras (losses.view_colour_spread):
    # without it, colours fit each rig camera separately and the views between them suffer.
    config.loss.view_colour = 1.0
    config.loss.scan = 1e4  # x metres^2 (Chamfer) or metres^2 (point_to_plane)
    config.loss.scan_metric = "chamfer"  # or "point_to_plane"
    config.loss.albedo = 0.1
    config.loss.scan_points = 2048  # points sampled on each scan
    config.loss.scan_gaussians = 4096  # Gaussians compared per step (all when fewer)
    config.loss.offset = 1e3  # x metres^2
    config.loss.scale = 1e2  # x metres beyond max_scale
    config.loss.max_scale = 0.01
    # x mean (1 - cos) of each Gaussian's thin axis against the surface normal: flat Gaussians stay tangent to the
    # surface, instead of turning edge-on to fit the training cameras and opening holes seen from others (issue 19).
    config.loss.normal_tilt = 0.0
    # x metres^2: posed Gaussians against the tracked mesh at their texels, on sequences with vertices.npy
    # (synthetic data, Multiface); 0 turns it off. It makes z follow the mouth (see prior_stage).
    config.loss.tracked_mesh = 1e5
    # Which Gaussians the term pulls: "all", or "expression" (those the template's expression rig moves: jaw,
    # lips, eyelids, brows, eyes), which leaves scalp, neck and ears free to fit hair and shapes off the template.
    config.loss.tracked_mesh_scope = "all"
    # What the tracked terms compare: "position" (the Gaussians on the tracked surface) or "motion" (their
    # displacement from the neutral code against the tracked mesh's from its sequence's mean, in head space), which
    # a tracker's static offset from the true surface does not bias (docs/benchmarks.md, session 10).
    config.loss.tracked_target = "position"
    # x metres^2: the same on the lips' Gaussians alone. Without it the decoded lips moved 1-3 mm² where the
    # tracked ones move 30-40 (LVE about their mean), even from oracle codes; at 2e5 they move 20-28 (see
    # docs/benchmarks.md, session 9). 0 turns it off.
    config.loss.tracked_lips = 2e5
    config.loss.camera_gain = 1.0  # x mean squared log gain (model.camera_gains)

    config.optimizer = ml_collections.ConfigDict()
    config.optimizer.learning_rate = 2e-3
    config.optimizer.warmup_steps = 50
    config.optimizer.grad_clip = 1.0
    # Adam's second-moment decay. Lower adapts faster to a sudden gradient (see the base preset).
    config.optimizer.b2 = 0.999

    config.render = ml_collections.ConfigDict()
    # Pair slots per camera: x the pairs of the first batch, bucketed; they grow (one recompile) when a step needs more.
    config.render.capacity_headroom = 1.5
    # Shrink the pair capacity when the last this-many steps needed at most 2/3 of it (0: grow only).
    config.render.capacity_shrink_after = 100

    config.eval = ml_collections.ConfigDict()
    config.eval.every = 100  # steps; held-out-view PSNR/SSIM and the neutral-scan Chamfer into metrics.jsonl
    config.eval.num_frames = 8
    config.eval.batch_size = 4

    config.train = default_config()
    config.train.steps = 500
    config.train.log_every = 25
    config.train.checkpoint_every = 100
    config.train.image_every = 0
    config.train.mesh.fsdp = 1
    # The template constants are gathered by texel every step: keep them whole on every device. Parameters
    # (and their Adam moments) fall to "auto": FSDP shards the large ones (large preset) over `fsdp`.
    config.train.sharding.rules = ((r"^rest/", "replicate"),)

    if preset == "base":
        config.data.synth_preset = "base"
        config.data.batch_size = 8
        config.data.num_views = 4
        config.data.num_threads = 8
        config.data.prefetch = 16
        config.data.decoded = True  # PNG decoding per step starved the GPU (issue 19)
        config.model.template_resolution = 96
        config.model.uv_resolution = 256
        config.model.decoder_base_resolution = 8
        config.model.decoder_channels = (256, 128, 64, 32, 16)
        config.model.expression_channels = (32, 64, 128, 128, 256, 256)
        config.model.expression_hidden = 512
        config.model.color_features = 16
        config.model.color_hidden = 64
        config.loss.lpips = 0.1
        # Off at 512^2, where the mouth spans enough pixels for the image-only encoder. The tracked vertices of every
        # record sit on every device when on ([records, 14.5k, 3]: ~0.7 GB for the full base preset's ~4k training
        # frames); not yet trained on the GPU.
        config.loss.tracked_mesh = 0.0
        # Issue 19: at 1e-3 the held-out-camera PSNR dipped 2.3 dB for one eval (the KL spiked to 131 nats);
        # half the rate, and evaluations and exports read a moving average of the parameters.
        config.optimizer.learning_rate = 5e-4
        config.optimizer.warmup_steps = 500
        # Issue 19 on one H200: the held-out-camera PSNR peaks at 26.1-26.2 dB with the shell against 25.5 without
        # (docs/benchmarks.md, session 12).
        config.model.hair_shell = 0.02
        # Issue 19 on one H200 (docs/benchmarks.md, sessions 18 and 22): with b2 0.999 one batch's KL jumped to
        # 300-600 nats every 1,000-2,000 steps and the held-out PSNR fell 0.50 dB from its best. b2 0.95 keeps the
        # KL under 110 nats (one row in 99 above 100) with no fall. Bounding the code as well (model.code_bound=3)
        # also stops the jumps, but costs 1.0-2.7 dB of held-out PSNR at equal steps and stalled at 23.1 dB in
        # session 22, so the code stays unbounded.
        config.optimizer.b2 = 0.95
        config.train.ema_decay = 0.999
        # The average is checked against the raw parameters on the image term: the scan term, which is most of
        # the loss here and the same for both, would hide an average that renders 6 dB worse.
        config.train.ema_check_metric = "l1"
        config.eval.every = 2000
        config.eval.num_frames = 32
        config.train.steps = 100_000
        config.train.log_every = 100
        config.train.checkpoint_every = 2000
        config.train.image_every = 2000
    elif preset == "large":
        config.data.synth_preset = "base"
        config.data.batch_size = 64
        config.data.num_views = 6
        config.data.num_threads = 16
        config.data.prefetch = 32
        config.data.decoded = True
        config.model.template_resolution = 96
        config.model.uv_resolution = 512
        config.model.decoder_base_resolution = 8
        config.model.decoder_channels = (512, 256, 128, 64, 32, 16)
        config.model.expression_channels = (32, 64, 128, 256, 256, 512)
        config.model.expression_hidden = 1024
        config.model.color_features = 16
        config.model.color_hidden = 64
        config.loss.lpips = 0.1
        config.loss.tracked_mesh = 0.0  # as in base
        config.optimizer.learning_rate = 5e-4
        config.optimizer.warmup_steps = 2000
        config.eval.every = 5000
        config.eval.num_frames = 64
        config.train.steps = 400_000
        config.train.log_every = 100
        config.train.checkpoint_every = 5000
        config.train.image_every = 5000
        config.train.mesh.fsdp = 8
        config.train.sharding.min_shard_size = 2**16
    return config
