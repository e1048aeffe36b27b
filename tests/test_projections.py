import pytest
import torch

from xvila.projections import InputProjection, InputProjectionConfig, OutputProjection, OutputProjectionConfig


@pytest.mark.parametrize("source", ["pooled", "patch"])
@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_input_projection_shapes(source, kind):
    proj = InputProjection(InputProjectionConfig(kind=kind, source=source, num_tokens=3),
                           in_dim=16 if source == "pooled" else 24, llm_dim=32)
    out = proj(torch.randn(5, 10, 24), torch.randn(5, 16))
    assert out.shape == (5, 3, 32)


@pytest.mark.parametrize("cond_shape", [(77, 768), (1, 512), (4, 16)])
def test_output_projection_shapes(cond_shape):
    proj = OutputProjection(OutputProjectionConfig(width=32, heads=4, encoder_layers=1, decoder_layers=1), 48, cond_shape)
    hidden = torch.randn(2, 8, 48, requires_grad=True)
    out = proj(hidden)
    assert out.shape == (2, *cond_shape)
    out.sum().backward()
    assert hidden.grad.abs().sum() > 0


def test_projection_config_errors():
    with pytest.raises(ValueError, match="kind"):
        InputProjectionConfig(kind="conv")
    with pytest.raises(ValueError, match="divisible"):
        OutputProjectionConfig(width=30, heads=4)
