"""Evidence, presence, zero-shot classification with prompt ensembles and fine-grained retrieval (PathFLIP)."""

import numpy as np
import pytest
import torch

from napari_pathflip.errors import PathflipError
from napari_pathflip.model import PathFLIP, PathFLIPConfig

from conftest import SMALL


@pytest.fixture(scope="module")
def model(weights):
    torch.manual_seed(1)
    model = PathFLIP.from_pretrained(weights)
    model.add_patch_head()
    for p in model.patch_head.parameters():  # a head that is not at its identity-like start
        p.data.add_(torch.randn_like(p) * 0.3)
    model.config.presence_scale, model.config.presence_bias = 0.7, -1.5
    return model.eval()


@pytest.fixture(scope="module")
def encodings(model):
    rng = np.random.default_rng(0)
    out = []
    for rows, cols in ((20, 24), (16, 16), (30, 12)):
        coords = np.stack(np.meshgrid(np.arange(cols), np.arange(rows)), -1).reshape(-1, 2) * 256
        out.append(model.encode_slide(rng.normal(size=(len(coords), model.config.patch_dim)).astype(np.float32),
                                      coords, 256))
    return out


def test_evidence_is_the_best_regions_grounding_logit(model, encodings):
    encoding = encodings[0]
    texts = ["necrosis", "fat lobules in the lower left part"]
    for k in (1, 3):
        model.config.evidence_regions = k
        evidence = model.evidence(encoding, texts)
        for text, value in zip(texts, evidence):
            region = model.ground(encoding, text, method="patch_head").region_scores  # probabilities
            best = np.sort(np.log(region) - np.log1p(-region))[::-1][:k].mean()
            assert float(value) == pytest.approx(best, abs=1e-4)
    model.config.evidence_regions = 1


def test_presence_and_classify_use_calibrated_ensemble_evidence(model, encodings):
    encoding = encodings[1]
    evidence = model.evidence(encoding, ["necrosis", "necrotic debris", "fat"]).double()
    present = model.presence(encoding, {"necrosis": ["necrosis", "necrotic debris"], "fat": "fat"})
    assert present["necrosis"] == pytest.approx(float(torch.sigmoid(0.7 * evidence[:2].mean() - 1.5)))
    assert present["fat"] == pytest.approx(float(torch.sigmoid(0.7 * evidence[2] - 1.5)))
    probs = model.classify(encoding, {"necrosis": ["necrosis", "necrotic debris"], "fat": ["fat"]})
    expected = torch.stack([evidence[:2].mean(), evidence[2]]).softmax(0)
    assert torch.allclose(probs.double(), expected, atol=1e-6) and probs.sum() == pytest.approx(1.0)
    # the paper's rule on bare slide embeddings is kept: softmax of cosine / temperature
    emb = encoding.slide_embedding
    by_cosine = model.classify(emb, ["necrosis", "fat"])
    assert torch.allclose(by_cosine, (model.similarity(emb, ["necrosis", "fat"])[0] / 0.1).softmax(0))
    with pytest.raises(PathflipError, match="at least one prompt"):
        model.classify(encoding, {"necrosis": []})


def test_retrieval_scores_each_sentence_where_the_slide_shows_it(model, encodings):
    texts = ["Necrosis is present. Fat lobules occupy the lower left part.", "Benign glands lie in the centre."]
    scores = model.retrieval_scores(encodings, texts)
    assert scores.shape == (2, 3)
    glob = model.similarity(torch.stack([e.slide_embedding for e in encodings]), texts).T.numpy() / 0.1
    for s, encoding in enumerate(encodings):
        first = model.evidence(encoding, ["Necrosis is present.", "Fat lobules occupy the lower left part."]).mean()
        second = model.evidence(encoding, ["Benign glands lie in the centre."])[0]
        assert scores[0, s] == pytest.approx(float(first) + glob[0, s], rel=1e-5)
        assert scores[1, s] == pytest.approx(float(second) + glob[1, s], rel=1e-5)
    # the paper's model (no head): the slide-embedding cosine alone, and evidence is that cosine / temperature
    plain = PathFLIP(PathFLIPConfig(patch_dim=model.config.patch_dim, **SMALL), model.tokenizer).eval()
    bare = [plain.encode_slide(e.patch_features, e.patch_coords, 256) for e in encodings]
    slides = torch.stack([e.slide_embedding for e in bare])
    assert np.allclose(plain.retrieval_scores(bare, texts), plain.similarity(slides, texts).T.numpy() / 0.1,
                       atol=1e-5)
    assert torch.allclose(plain.evidence(bare[0], texts), plain.similarity(slides[0], texts)[0] / 0.1, atol=1e-5)
