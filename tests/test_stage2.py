"""Stage 2 (CLIP-ReID for hands) on the tiny model and synthetic 11k: the model pieces (prompt
learner, two-feature image encoder), the image<->text loss, and bad templates."""
import pytest
import torch
from open_clip.modified_resnet import ModifiedResNet

import make_model
from config import ConfigError, load_config

TEMPLATE = "A photo of a X X X X hand."


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    clip_model, _ = make_model.build_model(load_config(None, [("model", "tiny")]))
    return clip_model.eval()


def test_prompt_learner_is_the_text_tower_on_its_tokens(tiny):
    learner = make_model.PromptLearner(make_model.TINY_ARCH, TEMPLATE, num_classes=3,
                                       width=tiny.token_embedding.embedding_dim)
    assert learner.context.shape == (3, 4, tiny.token_embedding.embedding_dim)
    literal = make_model.open_clip.get_tokenizer(make_model.TINY_ARCH)([TEMPLATE])
    with torch.no_grad():
        # Learned tokens equal to the embedding of the word X give the literal template.
        learner.context[1] = tiny.token_embedding(literal)[0, learner.positions]
        assert torch.allclose(learner(tiny, torch.tensor([1])), tiny.encode_text(literal),
                              atol=1e-5)
        other = learner(tiny, torch.tensor([0, 2]))
    assert other.shape == (2, tiny.text_projection.shape[1])
    assert not torch.allclose(other[0], other[1])


@pytest.mark.parametrize("template", ["A photo of a hand.", "A photo of a x x hand.",
                                      "A photo of an Xray hand."])
def test_template_without_placeholder_is_a_config_error(template):
    with pytest.raises(ConfigError, match="no X placeholder"):
        make_model.template_tokens(make_model.TINY_ARCH, template)


def test_template_that_does_not_fit_the_context_is_a_config_error():
    with pytest.raises(ConfigError, match="shorten or reword"):
        make_model.template_tokens(make_model.TINY_ARCH, "a hand " * 40 + "X.")


def test_image_pair_vit_projects_the_pre_projection_feature(tiny):
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        pre, proj = make_model.encode_image_pair(tiny.visual, images)
        assert torch.allclose(proj, tiny.encode_image(images), atol=1e-5)
    assert (pre.shape[1], proj.shape[1]) == make_model.image_pair_dims(tiny.visual) == (128, 64)


def test_image_pair_modified_resnet_pools_layer4_and_attention():
    # A narrow ModifiedResNet (the RN50 class) keeps this fast; widths as in RN50: 32x width.
    torch.manual_seed(0)
    visual = ModifiedResNet(layers=(1, 1, 1, 1), output_dim=24, heads=2, image_size=64,
                            width=8).eval()
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        pre, proj = make_model.encode_image_pair(visual, images)
        assert torch.allclose(proj, visual(images), atol=1e-5)
    assert (pre.shape[1], proj.shape[1]) == make_model.image_pair_dims(visual) == (256, 24)
