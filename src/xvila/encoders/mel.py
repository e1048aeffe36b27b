"""Kaldi-style log-mel filterbank features in torch (what ImageBind's audio tower was trained on).

ImageBind computes ``torchaudio.compliance.kaldi.fbank(htk_compat=True, use_energy=False, window_type="hanning",
dither=0, frame_length=25, frame_shift=10)``. torchaudio is not usable here, so this module re-implements the same
recipe from Kaldi's documented defaults:

- frames of 25 ms every 10 ms, only whole frames (``snip_edges``): ``F = 1 + (S - 400) // 160`` at 16 kHz;
- per frame: remove the DC offset, pre-emphasis 0.97, a symmetric Hann window, zero-pad to the next power of two;
- power spectrum, triangular filters equally spaced on Kaldi's mel scale ``1127 ln(1 + f / 700)`` between 20 Hz and
  Nyquist (the triangles are built in mel space, the Nyquist bin gets no weight);
- natural log with a floor at float32 epsilon.

Shapes: waveform (B, S) -> log-mel (B, M, F) with M mel bins and F frames.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

PREEMPHASIS = 0.97
LOW_FREQ_HZ = 20.0
LOG_FLOOR = float(np.finfo(np.float32).eps)  # 1.1920929e-07, Kaldi's floor before the log


def hz_to_mel(hz: np.ndarray | float) -> np.ndarray | float:
    """Kaldi's mel scale."""
    return 1127.0 * np.log(1.0 + np.asarray(hz, dtype=np.float64) / 700.0)


def mel_to_hz(mel: np.ndarray | float) -> np.ndarray | float:
    return 700.0 * (np.exp(np.asarray(mel, dtype=np.float64) / 1127.0) - 1.0)


def padded_window_length(frame_length: int) -> int:
    return 1 << math.ceil(math.log2(frame_length))


def mel_center_frequencies(num_mel_bins: int, sample_rate: int) -> np.ndarray:
    """Centre frequency (Hz) of each triangular filter, (M,)."""
    mel_low, mel_high = hz_to_mel(LOW_FREQ_HZ), hz_to_mel(sample_rate / 2)
    delta = (mel_high - mel_low) / (num_mel_bins + 1)
    return mel_to_hz(mel_low + delta * np.arange(1, num_mel_bins + 1))


def kaldi_mel_filterbank(num_mel_bins: int, n_fft: int, sample_rate: int) -> np.ndarray:
    """Triangular mel filters over the ``n_fft // 2 + 1`` rfft bins, (M, n_fft // 2 + 1), float32."""
    mel_low, mel_high = hz_to_mel(LOW_FREQ_HZ), hz_to_mel(sample_rate / 2)
    if num_mel_bins + 1 > (n_fft // 2):
        raise ValueError(f"{num_mel_bins} mel bins is too many for an FFT of {n_fft} points")
    delta = (mel_high - mel_low) / (num_mel_bins + 1)
    edges = mel_low + delta * np.arange(num_mel_bins + 2)  # (M + 2,) left, centre, right edges in mel
    left, centre, right = edges[:-2, None], edges[1:-1, None], edges[2:, None]  # (M, 1) each
    # Kaldi weights the bins below Nyquist only; the Nyquist column stays zero.
    bin_mel = hz_to_mel(np.arange(n_fft // 2) * sample_rate / n_fft)[None, :]  # (1, n_fft // 2)
    up = (bin_mel - left) / (centre - left)
    down = (right - bin_mel) / (right - centre)
    banks = np.maximum(0.0, np.minimum(up, down))  # (M, n_fft // 2)
    return np.pad(banks, ((0, 0), (0, 1))).astype(np.float32)  # (M, n_fft // 2 + 1)


def num_frames(num_samples: int, frame_length: int, frame_shift: int) -> int:
    """Whole frames in ``num_samples`` samples (Kaldi's snip_edges)."""
    return 0 if num_samples < frame_length else 1 + (num_samples - frame_length) // frame_shift


class LogMelFilterbank(nn.Module):
    """Waveform (B, S) -> Kaldi log-mel fbank (B, M, F), computed in float32.

    Holds its Hann window and filterbank as non-persistent buffers (they are not in ImageBind's checkpoint and are
    real tensors even when the model around them is built on the meta device).
    """

    def __init__(self, sample_rate: int, num_mel_bins: int, frame_length: int, frame_shift: int) -> None:
        super().__init__()
        self.sample_rate = sample_rate
        self.num_mel_bins = num_mel_bins
        self.frame_length = frame_length
        self.frame_shift = frame_shift
        self.n_fft = padded_window_length(frame_length)
        self.reset_buffers()

    def reset_buffers(self, device: torch.device | str | None = None) -> None:
        """(Re)create the window and filterbank, e.g. after loading weights into a meta-device model."""
        n = np.arange(self.frame_length)
        window = 0.5 - 0.5 * np.cos(2 * np.pi * n / (self.frame_length - 1))  # symmetric Hann ("hanning")
        banks = kaldi_mel_filterbank(self.num_mel_bins, self.n_fft, self.sample_rate)
        # torch.from_numpy ignores a surrounding `with torch.device(...)`: these stay real (CPU unless `device`).
        self.register_buffer("window", torch.from_numpy(window.astype(np.float32)).to(device), persistent=False)
        self.register_buffer("mel_banks", torch.from_numpy(banks).to(device), persistent=False)

    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        """waveform (B, S) float -> log-mel (B, M, F)."""
        if waveform.ndim != 2 or waveform.shape[-1] < self.frame_length:
            raise ValueError(
                f"expected a waveform of shape (B, S) with S >= {self.frame_length}, got {tuple(waveform.shape)}"
            )
        with torch.autocast(device_type=waveform.device.type, enabled=False):
            x = waveform.float()
            frames = x.unfold(-1, self.frame_length, self.frame_shift)  # (B, F, W)
            frames = frames - frames.mean(dim=-1, keepdim=True)  # remove the DC offset per frame
            previous = torch.cat([frames[..., :1], frames[..., :-1]], dim=-1)  # x[n-1], with x[-1] := x[0]
            frames = (frames - PREEMPHASIS * previous) * self.window  # (B, F, W)
            spectrum = torch.fft.rfft(frames, n=self.n_fft)  # (B, F, n_fft // 2 + 1)
            power = spectrum.real.square() + spectrum.imag.square()
            mel = power @ self.mel_banks.T  # (B, F, M)
            return mel.clamp_min(LOG_FLOOR).log().transpose(1, 2)  # (B, M, F)


def pad_or_crop_frames(log_mel: torch.Tensor, target_frames: int, value: float = 0.0) -> torch.Tensor:
    """(B, M, F) -> (B, M, target_frames): pad at the end with ``value`` or crop the tail (ImageBind pads with 0)."""
    missing = target_frames - log_mel.shape[-1]
    if missing > 0:
        return F.pad(log_mel, (0, missing), value=value)
    return log_mel[..., :target_frames]
