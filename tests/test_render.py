"The built-in judges rendered by nbs/01_render.ipynb, built from their shipped manifests as the demo builds them."
import numpy as np
import pytest
import torch
import yaml


def test_shape_count_is_a_judge_raw_pixels_do_not_pass(tmp_path):
    "shape-count's splits: built from their manifests, disjoint, balanced, labelled by the count, near chance for pixels."
    from prepretrain_lit.data import build_from_recipe, shipped_manifest
    from prepretrain_lit.knn import knn_evaluate
    from prepretrain_lit.manifest import load_manifest
    from prepretrain_lit.transfer import pixel_features
    train, test = (build_from_recipe(shipped_manifest(f"shape-count-{s}"), tmp_path / s, progress=False)
                   for s in ("train", "test"))
    assert (load_manifest(train).num_samples, load_manifest(test).num_samples) == (2000, 1000)
    assert load_manifest(test).classes == ["one", "two", "three"]
    a, b = pixel_features(str(train), 32), pixel_features(str(test), 32)
    assert min(np.bincount(a.labels.numpy())) > 600 and min(np.bincount(b.labels.numpy())) > 300
    assert torch.cdist(b.features[:50], a.features).min() > 1.0                 # no test image is a training image
    top1 = knn_evaluate(a, b)[0]["value"]
    assert top1 < 42, top1                                                        # chance is 33.3%: pixels cannot count


def test_rendered_split_names_its_splits(tmp_path):
    "A recipe naming a split the judge lacks, or the wrong size, is refused in one line that names the valid ones."
    from prepretrain_lit.data import build_from_recipe, shipped_manifest
    from prepretrain_lit.manifest import ManifestError
    recipe = yaml.safe_load(shipped_manifest("shape-count-val").read_text())
    recipe["recipe"]["split"] = "holdout"
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(recipe))
    with pytest.raises(ManifestError, match="shape-count has splits train, val, test, not 'holdout'"):
        build_from_recipe(tmp_path / "bad.yaml", tmp_path / "out", progress=False)
    recipe["recipe"]["split"], recipe["num_samples"] = "val", 999
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(recipe))
    with pytest.raises(ManifestError, match="the shape-count val split has 1000"):
        build_from_recipe(tmp_path / "bad.yaml", tmp_path / "out", progress=False)
