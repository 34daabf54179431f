"""Lip metrics: LVE and FDD against hand-written loops; the cross-correlation sync score recovers planted lags
at any fps; SyncNet (syncnet_v2) and LSE-D/LSE-C against syncnet_python's PyTorch model and scoring code."""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import torch
from helpers.seeds import fresh_seed
from torch import nn

from uhap_jax.eval import lip_metrics, syncnet
from uhap_jax.geometry.template import procedural_head


def test_lip_vertex_error_matches_hand_computation(rng):
    pred, gt = rng.normal(size=(2, 4, 7, 3))
    lip_ids = np.array([1, 4, 6])
    per_frame = []
    for t in range(4):
        errors = [sum((pred[t, v, k] - gt[t, v, k]) ** 2 for k in range(3)) for v in lip_ids]
        per_frame.append(max(errors))
    assert lip_metrics.lip_vertex_error(pred, gt, lip_ids) == pytest.approx(sum(per_frame) / 4, rel=1e-12)
    # Only lip vertices count: changing another vertex changes nothing.
    pred[:, 0] += 10.0
    assert lip_metrics.lip_vertex_error(pred, gt, lip_ids) == pytest.approx(sum(per_frame) / 4, rel=1e-12)


def test_upper_face_dynamics_deviation_matches_hand_computation(rng):
    neutral = rng.normal(size=(6, 3))
    gt = neutral + 0.1 * rng.normal(size=(5, 6, 3))
    pred = neutral + 0.03 * rng.normal(size=(5, 6, 3))
    upper = np.array([0, 2, 3])

    def dynamics(vertices):
        stds = []
        for v in upper:
            squared = [sum((vertices[t, v, k] - neutral[v, k]) ** 2 for k in range(3)) for t in range(5)]
            mean = sum(squared) / 5
            stds.append(np.sqrt(sum((s - mean) ** 2 for s in squared) / 5))
        return sum(stds) / len(stds)

    fdd = lip_metrics.upper_face_dynamics_deviation(pred, gt, neutral, upper)
    assert fdd == pytest.approx(dynamics(gt) - dynamics(pred), rel=1e-10)
    # A motionless prediction scores the whole ground-truth dynamics; a perfect one scores zero.
    still = np.broadcast_to(neutral, gt.shape)
    assert lip_metrics.upper_face_dynamics_deviation(still, gt, neutral, upper) == pytest.approx(dynamics(gt))
    assert lip_metrics.upper_face_dynamics_deviation(gt, gt, neutral, upper) == 0.0


def test_rms_envelope_is_exact_at_non_integer_fps(rng):
    sample_rate, fps, num_frames = 16_000, 29.97, 12
    edges = np.round(np.arange(num_frames + 1) * sample_rate / fps).astype(int)
    levels = rng.uniform(0.1, 1.0, num_frames)
    signs = rng.choice([-1.0, 1.0], size=edges[-1])
    waveform = np.repeat(levels, np.diff(edges)) * signs
    envelope = lip_metrics.audio_rms_envelope(waveform, sample_rate, fps)
    np.testing.assert_allclose(envelope, levels, rtol=1e-9)
    with pytest.raises(ValueError, match="cover 12 frames"):
        lip_metrics.audio_rms_envelope(waveform, sample_rate, fps, num_frames=13)


@pytest.mark.parametrize("lag", [-7, -2, 0, 3, 9])
def test_planted_lag_is_recovered_from_envelopes(rng, lag):
    # A smooth random "syllable" envelope, and a mouth that follows it `lag` frames later, with noise.
    envelope = np.convolve(rng.random(260), np.hanning(7), mode="same")
    mouth = np.roll(envelope, lag)[20:-20] + 0.02 * rng.normal(size=220)
    sync = lip_metrics.lip_sync_offset(envelope[20:-20], mouth, max_lag=12)
    assert sync.offset == lag
    assert sync.correlations.max() > 0.9 and sync.confidence > 0.3
    np.testing.assert_array_equal(sync.lags, np.arange(-12, 13))


@pytest.mark.parametrize("fps", [25.0, 30.0])
def test_planted_lag_is_recovered_from_audio_and_vertices(rng, fps):
    """End to end: amplitude-modulated noise as speech, a jaw that opens with it `lag` frames late."""
    sample_rate, num_frames, lag = 16_000, 150, int(rng.integers(1, 6))
    loudness = np.convolve(rng.random(num_frames), np.hanning(5), mode="same")
    edges = np.round(np.arange(num_frames + 1) * sample_rate / fps).astype(int)
    waveform = np.repeat(loudness, np.diff(edges)) * rng.normal(size=edges[-1])

    num_vertices, upper, lower = 10, np.array([2, 5]), np.array([3, 8])
    vertices = np.broadcast_to(rng.normal(size=(num_vertices, 3)), (num_frames, num_vertices, 3)).copy()
    opening = np.concatenate([np.full(lag, loudness[0]), loudness[:-lag]])
    vertices[:, lower, 1] = vertices[:, upper, 1] - 0.01 - 0.02 * opening[:, None]

    envelope = lip_metrics.audio_rms_envelope(waveform, sample_rate, fps, num_frames)
    mouth = lip_metrics.mouth_opening(vertices, upper, lower)
    sync = lip_metrics.lip_sync_offset(envelope, mouth, max_lag=8)
    assert sync.offset == lag and sync.confidence > 0.2


def test_template_vertex_sets():
    template = procedural_head()
    lips = lip_metrics.lip_vertex_ids(template)
    upper = lip_metrics.upper_face_vertex_ids(template)
    assert lips.size > 0 and np.all(template.region_mask("lips")[lips])
    assert upper.size > 0 and np.intersect1d(lips, upper).size == 0
    assert template.vertices[upper, 1].min() > template.vertices[lips, 1].max()
    assert np.all(template.region_mask("brows")[np.flatnonzero(template.region_mask("brows"))])
    assert np.isin(np.flatnonzero(template.region_mask("brows")), upper).all()
    upper_lip, lower_lip = lip_metrics.mouth_landmark_ids(template)
    assert np.linalg.norm(template.vertices[upper_lip] - template.vertices[lower_lip]) < 1e-3


def test_bad_inputs_raise_clear_errors(rng):
    pred = rng.normal(size=(3, 5, 3))
    with pytest.raises(ValueError, match="differ in shape"):
        lip_metrics.lip_vertex_error(pred, pred[:, :4], [0])
    with pytest.raises(ValueError, match="outside the mesh's 5 vertices"):
        lip_metrics.lip_vertex_error(pred, pred, [1, 5])
    with pytest.raises(ValueError, match=r"must be \[frames, vertices, 3\]"):
        lip_metrics.mouth_opening(pred[0], [0], [1])
    with pytest.raises(ValueError, match="too few for lags"):
        lip_metrics.lip_sync_offset(rng.random(10), rng.random(10), max_lag=5)


# ----------------------------------------------------------------------------------------- SyncNet


def test_mfcc_matches_python_speech_features_golden_values():
    """Rows 0, 7 and 23 of python_speech_features.mfcc (v0.6, defaults) on a chirp plus a tone, in int16 units."""
    t = np.arange(4000) / 16_000
    waveform = 0.3 * np.sin(2 * np.pi * (200 * t + 1500 * t**2)) + 0.1 * np.sin(2 * np.pi * 3000 * t)
    golden = {
        0: [21.03824, -2.38902, 3.97632, 49.24551, -12.22931, -22.83183, 19.75387, -33.48528, -38.53722,
            6.85506, -28.94613, -27.84485, 12.29691],
        7: [21.18695, 9.85421, -20.91534, 28.38322, -47.16221, -45.72802, 2.46920, -29.29260, -17.99638,
            41.00166, 5.20237, 3.79855, 28.98694],
        23: [21.42410, 12.14387, -33.79830, 10.06628, -40.80252, 0.91790, 56.68796, 0.97772, -31.77395,
             4.11692, -23.08168, -1.83147, 34.39094],
    }  # fmt: skip
    coefficients = syncnet.mfcc(syncnet.to_int16_units(waveform))
    assert coefficients.shape == (24, 13)
    for row, values in golden.items():
        np.testing.assert_allclose(coefficients[row], values, atol=2e-5)


class TorchSyncNet(nn.Module):
    """syncnet_python's SyncNetModel.S, the reference the NNX model must equal (and the state dict's source)."""

    def __init__(self):
        super().__init__()

        def conv_bn(conv, features, pool=None):
            layers = [conv, nn.BatchNorm2d(features) if conv.weight.ndim == 4 else nn.BatchNorm3d(features)]
            return layers + [nn.ReLU()] + ([pool] if pool is not None else [])

        def head():
            return nn.Sequential(nn.Linear(512, 512), nn.BatchNorm1d(512), nn.ReLU(), nn.Linear(512, 1024))

        self.netcnnaud = nn.Sequential(
            *conv_bn(nn.Conv2d(1, 64, 3, padding=1), 64, nn.MaxPool2d(1, 1)),
            *conv_bn(nn.Conv2d(64, 192, 3, padding=1), 192, nn.MaxPool2d(3, (1, 2))),
            *conv_bn(nn.Conv2d(192, 384, 3, padding=1), 384),
            *conv_bn(nn.Conv2d(384, 256, 3, padding=1), 256),
            *conv_bn(nn.Conv2d(256, 256, 3, padding=1), 256, nn.MaxPool2d(3, 2)),
            *conv_bn(nn.Conv2d(256, 512, (5, 4)), 512),
        )
        self.netfcaud, self.netfclip = head(), head()
        self.netcnnlip = nn.Sequential(
            *conv_bn(nn.Conv3d(3, 96, (5, 7, 7), (1, 2, 2)), 96, nn.MaxPool3d((1, 3, 3), (1, 2, 2))),
            *conv_bn(
                nn.Conv3d(96, 256, (1, 5, 5), (1, 2, 2), (0, 1, 1)),
                256,
                nn.MaxPool3d((1, 3, 3), (1, 2, 2), (0, 1, 1)),
            ),
            *conv_bn(nn.Conv3d(256, 256, (1, 3, 3), padding=(0, 1, 1)), 256),
            *conv_bn(nn.Conv3d(256, 256, (1, 3, 3), padding=(0, 1, 1)), 256),
            *conv_bn(nn.Conv3d(256, 256, (1, 3, 3), padding=(0, 1, 1)), 256, nn.MaxPool3d((1, 3, 3), (1, 2, 2))),
            *conv_bn(nn.Conv3d(256, 512, (1, 6, 6)), 512),
        )

    def forward_aud(self, x):
        return self.netfcaud(self.netcnnaud(x).flatten(1))

    def forward_lip(self, x):
        return self.netfclip(self.netcnnlip(x).flatten(1))


@pytest.fixture(scope="module")
def torch_syncnet():
    """A random syncnet_v2 in eval mode, batch-norm statistics randomised so that they matter."""
    torch.manual_seed(fresh_seed("torch_syncnet"))
    model = TorchSyncNet().eval()
    for module in model.modules():
        if isinstance(module, nn.BatchNorm1d | nn.BatchNorm2d | nn.BatchNorm3d):
            module.running_mean.normal_(0.0, 0.1)
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.normal_(0.0, 0.1)
    return model


@pytest.fixture(scope="module")
def syncnet_file(torch_syncnet, tmp_path_factory):
    path = tmp_path_factory.mktemp("syncnet") / "syncnet_v2.model"
    torch.save(torch_syncnet.state_dict(), path)
    return path


def _relative_error(a, b):
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def test_syncnet_forward_matches_pytorch(torch_syncnet, syncnet_file, rng):
    model = syncnet.load_syncnet(syncnet_file)
    mfcc_windows = rng.normal(0.0, 10.0, size=(2, 13, 20)).astype(np.float32)
    crops = rng.uniform(0.0, 255.0, size=(2, 5, 224, 224, 3)).astype(np.float32)
    with torch.no_grad():
        audio_ref = torch_syncnet.forward_aud(torch.from_numpy(mfcc_windows)[:, None]).numpy()
        lip_ref = torch_syncnet.forward_lip(torch.from_numpy(crops.transpose(0, 4, 1, 2, 3).copy())).numpy()
    assert _relative_error(np.asarray(model.audio_embedding(jnp.asarray(mfcc_windows))), audio_ref) < 1e-4
    assert _relative_error(np.asarray(model.lip_embedding(jnp.asarray(crops))), lip_ref) < 1e-4


def test_syncnet_npz_and_safetensors_load_the_same_weights(torch_syncnet, syncnet_file, tmp_path):
    state = {k: v.numpy() for k, v in torch_syncnet.state_dict().items() if "num_batches" not in k}
    np.savez(tmp_path / "syncnet.npz", **state)
    safetensors.numpy.save_file(state, str(tmp_path / "syncnet.safetensors"))
    reference = syncnet.load_syncnet(syncnet_file)
    for name in ("syncnet.npz", "syncnet.safetensors"):
        loaded = syncnet.load_syncnet(tmp_path / name)
        for key, (variable, _) in syncnet.syncnet_key_map(loaded).items():
            expected = syncnet.syncnet_key_map(reference)[key][0]
            np.testing.assert_array_equal(variable.get_value(), expected.get_value(), err_msg=key)


def test_syncnet_missing_or_misshaped_key_is_a_clear_error(torch_syncnet, tmp_path):
    state = {k: v.clone() for k, v in torch_syncnet.state_dict().items()}
    del state["netcnnlip.15.running_var"]
    missing_path = tmp_path / "missing.pth"
    torch.save(state, missing_path)
    with pytest.raises(ValueError, match=rf"{missing_path}.*missing keys \['netcnnlip.15.running_var'\]"):
        syncnet.load_syncnet(missing_path)

    state = {k: v.clone() for k, v in torch_syncnet.state_dict().items()}
    state["netfcaud.3.weight"] = torch.zeros(512, 512)
    misshaped_path = tmp_path / "misshaped.pth"
    torch.save(state, misshaped_path)
    with pytest.raises(
        ValueError, match=rf"{misshaped_path}: netfcaud.3.weight has shape \(512, 512\); .*\(1024, 512\)"
    ):
        syncnet.load_syncnet(misshaped_path)
    with pytest.raises(FileNotFoundError, match="never downloaded"):
        syncnet.load_syncnet(tmp_path / "absent.pth")


def _reference_scores(video, audio, vshift):
    """syncnet_python's calc_pdist and offset/confidence, verbatim in torch."""
    video, audio = torch.from_numpy(video), torch.from_numpy(audio)
    padded = torch.nn.functional.pad(audio, (0, 0, vshift, vshift))
    win = 2 * vshift + 1
    dists = [
        torch.nn.functional.pairwise_distance(video[[i], :].repeat(win, 1), padded[i : i + win, :])
        for i in range(len(video))
    ]
    mdist = torch.mean(torch.stack(dists, 1), 1)
    minval, minidx = torch.min(mdist, 0)
    return (
        int(vshift - minidx),
        float(minval),
        float(torch.median(mdist) - minval),
        torch.stack(dists).numpy(),
    )


def test_lse_scores_match_reference_and_find_planted_offset(rng):
    shift = int(rng.integers(-6, 7))
    video = rng.normal(size=(60, 32))
    audio = np.roll(video, -shift, axis=0) + 0.05 * rng.normal(size=video.shape)  # video i ~ audio i - shift
    scores = syncnet.scores_from_embeddings(video, audio, vshift=10)
    offset, lse_d, lse_c, distances = _reference_scores(video, audio, 10)
    assert scores.offset == offset == shift
    np.testing.assert_allclose([scores.lse_d, scores.lse_c], [lse_d, lse_c], rtol=1e-10)
    np.testing.assert_allclose(scores.distances, distances, rtol=1e-10)
    assert scores.lse_c > 1.0


def test_lip_sync_error_matches_reference_pipeline(torch_syncnet, syncnet_file, rng):
    """Windows, MFCC alignment, BGR order and scoring, against syncnet_python's evaluate() loop."""
    num_frames = 9
    crops = rng.integers(0, 256, size=(num_frames, 224, 224, 3), dtype=np.uint8)
    waveform = 0.2 * rng.normal(size=num_frames * 640 + 100)
    scores = syncnet.lip_sync_error(syncnet.load_syncnet(syncnet_file), crops, waveform, vshift=3, batch_size=3)

    # The reference: BGR frames [1, 3, T, H, W], int16 MFCCs [1, 1, 13, steps], windows at 4·i.
    imtv = torch.from_numpy(crops[..., ::-1].transpose(3, 0, 1, 2)[None].astype(np.float32))
    cct = torch.from_numpy(syncnet.mfcc(syncnet.to_int16_units(waveform)).T[None, None].astype(np.float32))
    lastframe = min(num_frames, math.floor(waveform.size / 640)) - 5
    with torch.no_grad():
        video = torch.cat([torch_syncnet.forward_lip(imtv[:, :, i : i + 5]) for i in range(lastframe)])
        audio = torch.cat([torch_syncnet.forward_aud(cct[:, :, :, 4 * i : 4 * i + 20]) for i in range(lastframe)])
    offset, lse_d, lse_c, distances = _reference_scores(video.double().numpy(), audio.double().numpy(), 3)
    assert scores.distances.shape == (lastframe, 7)
    # Every window's distance at every lag matches (float32 embeddings: about 1e-7 relative), which pins the whole
    # curve. The offset is its argmin: random weights give lags within ~1e-3 of each other (about 1e-4 of LSE-D),
    # where float32 rounding may pick the other of two near-equal lags, so offsets must agree only where the
    # reference's best two lags are further apart than 1e-4 of LSE-D.
    np.testing.assert_allclose(scores.distances, distances, rtol=1e-4)
    assert scores.offset == 3 - int(np.argmin(np.mean(scores.distances, 0)))
    best, second = np.sort(distances.mean(0))[:2]
    if second - best > 1e-4 * lse_d:
        assert scores.offset == offset, (best, second)
    np.testing.assert_allclose([scores.lse_d, scores.lse_c], [lse_d, lse_c], rtol=1e-4, atol=1e-4 * lse_d)
