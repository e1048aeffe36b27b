import pytest
import torch

from xvila.projections import InputProjection, InputProjectionConfig, OutputProjection, OutputProjectionConfig


@pytest.mark.parametrize("source", ["pooled", "patch", "both"])
@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_input_projection_shapes(source, kind):
    proj = InputProjection(InputProjectionConfig(kind=kind, source=source, num_tokens=3), patch_dim=24, llm_dim=32,
                           pooled_dim=16)
    out = proj(torch.randn(5, 10, 24), torch.randn(5, 16))
    assert out.shape == (5, 3, 32)


def test_both_source_puts_the_pooled_token_first_and_patch_groups_after():
    torch.manual_seed(0)
    proj = InputProjection(InputProjectionConfig(source="both", num_tokens=3), patch_dim=4, llm_dim=8, pooled_dim=2)
    patches, pooled = torch.randn(1, 6, 4), torch.randn(1, 2)
    out = proj(patches, pooled)
    torch.testing.assert_close(out[:, 0], proj.pooled_proj(pooled))
    torch.testing.assert_close(out[:, 1], proj.proj(patches[:, :3].mean(1)))  # 6 patches -> 2 groups of 3
    torch.testing.assert_close(out[:, 2], proj.proj(patches[:, 3:].mean(1)))


@pytest.mark.parametrize("cond_shape", [(77, 768), (1, 512), (4, 16)])
def test_output_projection_shapes(cond_shape):
    proj = OutputProjection(OutputProjectionConfig(width=32, heads=4, encoder_layers=1, decoder_layers=1), 48, cond_shape, 8)
    hidden = torch.randn(2, 8, 48, requires_grad=True)
    out = proj(hidden)
    assert out.shape == (2, *cond_shape)
    out.sum().backward()
    assert hidden.grad.abs().sum() > 0



def test_output_projection_with_context_ignores_masked_states_and_checks_the_window():
    torch.manual_seed(0)
    config = OutputProjectionConfig(width=32, heads=4, encoder_layers=1, decoder_layers=1, context=5)
    proj = OutputProjection(config, 12, (1, 6), 3).eval()
    states = torch.randn(4, 8, 12)
    mask = torch.ones(4, 8, dtype=torch.bool)
    mask[1, :2] = False  # a run 3 positions from its sequence's start
    mask[2, :5] = False
    out = proj(states, mask)
    changed = states.clone()
    changed[1, :2] = 1e3
    changed[2, :5] = -7.0
    torch.testing.assert_close(proj(changed, mask), out)  # what the mask drops does not count
    changed[0, 0] = 3.0
    assert not torch.allclose(proj(changed, mask)[0], out[0])  # a kept context state does
    torch.testing.assert_close(proj(states, torch.ones_like(mask))[3], out[3])  # rows are independent
    with torch.no_grad():
        proj.position.normal_()
    assert not torch.allclose(proj(states, mask), out)  # the window positions are told apart
    with pytest.raises(ValueError, match="reads 8 hidden states per run"):
        proj(states[:, 5:])
    with pytest.raises(ValueError, match="context must be >= 0"):
        OutputProjectionConfig(context=-1)


def test_standardize_uses_only_the_kept_states():
    proj = OutputProjection(OutputProjectionConfig(width=32, heads=4, encoder_layers=1, decoder_layers=1, context=2),
                            3, (1, 4), 1)
    states = torch.randn(20, 3, 3)
    mask = torch.ones(20, 3, dtype=torch.bool)
    mask[:10, 0] = False
    states[:10, 0] = 1e4  # zeros-like filler in a real window; far off here, so it would show
    proj.standardize(states, mask)
    torch.testing.assert_close(proj.input_mean, states[mask].mean(0))
    assert proj.input_mean.abs().max() < 10


def test_projection_config_errors():
    with pytest.raises(ValueError, match="kind"):
        InputProjectionConfig(kind="conv")
    with pytest.raises(ValueError, match="num_tokens must be >= 2"):
        InputProjectionConfig(source="both", num_tokens=1)
    with pytest.raises(ValueError, match="pooled embedding's size"):
        InputProjection(InputProjectionConfig(source="both"), patch_dim=4, llm_dim=8)
    with pytest.raises(ValueError, match="divisible"):
        OutputProjectionConfig(width=30, heads=4)
    with pytest.raises(ValueError, match="vocabulary_scale"):
        InputProjectionConfig(vocabulary_scale=-1.0)


def test_vocabulary_projection_gives_mixtures_of_the_llm_words():
    """With ``vocabulary_scale`` each token is a softmax mixture of the word embeddings by cosine similarity: a large
    scale picks the nearest word itself; the plain vectors are what ``project`` returns."""
    torch.manual_seed(0)
    words = torch.randn(50, 8)
    patches, pooled = torch.randn(3, 6, 4), torch.randn(3, 2)
    sharp = InputProjection(InputProjectionConfig(source="both", num_tokens=3, vocabulary_scale=1e4), 4, 8, 2)
    vectors = sharp.project(patches, pooled)  # (3, 3, 8)
    cosine = torch.nn.functional.normalize(vectors, dim=-1) @ torch.nn.functional.normalize(words, dim=-1).T
    torch.testing.assert_close(sharp(patches, pooled, words), words[cosine.argmax(-1)])

    soft = InputProjection(InputProjectionConfig(source="both", num_tokens=3, vocabulary_scale=2.0), 4, 8, 2)
    soft.load_state_dict(sharp.state_dict())
    weights = (2.0 * cosine).softmax(-1)
    torch.testing.assert_close(soft(patches, pooled, words), weights @ words)
    assert weights.max() < 0.5  # a real mixture, not one word
    with pytest.raises(ValueError, match="word embeddings"):
        soft(patches, pooled)


def test_word_table_normalized_once_and_again_after_a_change():
    projection = InputProjection(InputProjectionConfig(source="pooled", num_tokens=2, vocabulary_scale=3.0), 4, 8, 2)
    words, patches, pooled = torch.randn(50, 8), torch.randn(3, 6, 4), torch.randn(3, 2)
    first = projection(patches, pooled, words.detach())
    unit = projection._unit_words_cache[2]
    torch.testing.assert_close(projection(patches, pooled, words.detach()), first)
    assert projection._unit_words_cache[2] is unit  # another view of the same table: no new normalization
    words.mul_(-1)  # an in-place change: the cache must notice
    flipped = projection(patches, pooled, words)
    cosine = torch.nn.functional.normalize(projection.project(patches, pooled), dim=-1) @ \
        torch.nn.functional.normalize(words, dim=-1).T
    torch.testing.assert_close(flipped, (3.0 * cosine).softmax(-1) @ words)
    assert not torch.allclose(flipped, first)


def test_model_with_a_vocabulary_projection_mixes_its_llm_words(tmp_path):
    """The model hands its LLM's pretrained word table (not the added tokens' rows) to the projections, and the
    setting survives save / load."""
    from xvila.config import XVilaConfig
    from xvila.model import XVilaModel

    config = XVilaConfig.tiny()
    config = config.replace(input_projection=config.input_projection.replace(vocabulary_scale=1e4))
    model = XVilaModel(config).eval()
    words = model.word_embeddings()
    assert words.shape[0] == model.llm.get_input_embeddings().first_new_id
    encoded = {"image": model.encode("image", torch.rand(2, *model.input_shape("image")))}
    tokens = model.project_inputs(encoded)[model.placeholder_ids["image"]]  # (2, K, D)
    # every media token is (all but exactly) one of the pretrained words
    distance = torch.cdist(tokens.reshape(-1, tokens.shape[-1]), words).min(-1).values
    assert distance.max() < 1e-3
    model.save_pretrained(tmp_path / "m")
    assert XVilaModel.from_pretrained(tmp_path / "m").config.input_projection.vocabulary_scale == 1e4


def test_standardize_sets_input_statistics_and_keeps_the_output_finite():
    torch.manual_seed(0)
    proj = OutputProjection(OutputProjectionConfig(width=32, heads=4, encoder_layers=1, decoder_layers=1), 6, (1, 4), 3)
    hidden = torch.randn(50, 3, 6) * torch.tensor([0.1, 1.0, 1e3, 1.0, 1.0, 50.0]) + 7.0
    before = proj(hidden)
    proj.standardize(hidden)
    flat = ((hidden - proj.input_mean) / proj.input_std).reshape(-1, 6)
    torch.testing.assert_close(flat.mean(0), torch.zeros(6), atol=1e-3, rtol=0)
    torch.testing.assert_close(flat.std(0), torch.ones(6), atol=0.05, rtol=0)
    assert not torch.allclose(proj(hidden), before)
    assert {"input_mean", "input_std"} <= {k.split(".")[-1] for k in proj.state_dict()}  # saved with the weights


def test_projection_objective_fits_caption_embeddings_from_hidden_states():
    """The phase-3a' objective on collected pairs: the projection learns a hidden-state -> caption-embedding map
    that a constant (the mean target, what a collapsed projection predicts) cannot match."""
    from xvila.train.data import generation_state_batches
    from xvila.train.objectives import ProjectionObjective

    torch.manual_seed(0)
    hidden = torch.randn(256, 2, 16) * torch.linspace(0.01, 100, 16)  # features on very different scales
    targets = torch.tanh(hidden[:, :1, :8] / torch.linspace(0.01, 100, 16)[:8])  # (256, 1, 8)

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            config = OutputProjectionConfig(width=32, heads=4, encoder_layers=1, decoder_layers=1)
            self.output_projections = torch.nn.ModuleDict({"image": OutputProjection(config, 16, (1, 8), 2)})

    model = Model()
    model.output_projections["image"].standardize(hidden)
    objective = ProjectionObjective(model, ("image",))
    assert ProjectionObjective.model_key("projections.image.proj_in.weight") == "output_projections.image.proj_in.weight"
    optimizer = torch.optim.AdamW(objective.parameters(), lr=3e-3)
    mask = torch.ones(hidden.shape[:2], dtype=torch.bool)
    batches = generation_state_batches({"image": (hidden, mask, targets)}, batch_size=32, seed=0)
    for _ in range(300):
        out = objective(next(batches))
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
    constant = torch.nn.functional.mse_loss(targets.mean(0, keepdim=True).expand_as(targets), targets)
    with torch.no_grad():
        fitted = torch.nn.functional.mse_loss(model.output_projections["image"](hidden), targets)
    assert set(out.losses) == {"align", "align/image"}
    assert fitted < 0.3 * constant


def test_generation_state_batches_follow_the_micro_slot():
    from xvila.train.data import generation_state_batches

    states = {"video": (torch.arange(40.0).view(10, 1, 4), torch.arange(10).view(10, 1) % 2 == 0,
                        torch.arange(10.0).view(10, 1, 1))}
    a = generation_state_batches(states, batch_size=3, seed=1)
    first, second = next(a), next(a)
    resumed = next(generation_state_batches(states, batch_size=3, seed=1, start=1))
    assert torch.equal(resumed.states["video"][0], second.states["video"][0])
    assert not torch.equal(first.states["video"][0], second.states["video"][0])
    h, mask, e = first.states["video"]
    assert torch.equal(h[:, 0, 0] / 4, e[:, 0, 0]) and len(first) == 3  # rows stay paired
    assert torch.equal(mask[:, 0], e[:, 0, 0] % 2 == 0)


@pytest.mark.parametrize("phase_precision,collect,expected", [
    ("no", None, False), ("bf16", None, True), ("no", "bf16", True), ("bf16", "no", False)])
def test_projections_phase_collects_in_its_collect_precision(monkeypatch, phase_precision, collect, expected):
    """``projections.collect_precision`` sets the autocast of the LLM pass that collects the states (the phase's
    ``precision`` when it is left out), independently of the precision the projections train in."""
    from xvila.train import loop
    from xvila.train.config import PhaseConfig
    from xvila.train.distributed import Runtime

    seen = []

    class Collected(Exception):
        pass

    def record(*args, **kwargs):
        seen.append(torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16)
        raise Collected

    monkeypatch.setattr(loop, "collect_generation_states", record)
    phase = PhaseConfig.from_dict({
        "name": "p", "objective": "projections", "precision": phase_precision,
        "projections": {"samples": 4, **({"collect_precision": collect} if collect else {})},
        "trainable": {"groups": {"output_projections": "full"}},
        "data": {"source": "world:4", "tasks": {"text->image": 1.0}}})
    with pytest.raises(Collected):
        loop.phase_batches(phase, torch.nn.Linear(1, 1), Runtime(0, 1, 0, torch.device("cpu")), 0)
    assert seen == [expected]


def test_collect_precision_is_checked():
    from xvila.train.config import ProjectionsConfig

    with pytest.raises(ValueError, match="collect_precision 'fp16'"):
        ProjectionsConfig(collect_precision="fp16")
