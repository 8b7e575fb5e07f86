import torch

from detrkit import Detector, build_model, get_preset
from detrkit.engine.finetune import prepare_finetune


def test_finetune_reinitialises_the_head_and_loads_the_rest(tmp_path):
    src_cfg = get_preset("detr-tiny").model.with_classes(["person", "car", "dog"], [1, 3, 18])
    src = Detector.from_config(src_cfg)
    src.save_pretrained(tmp_path / "coco")
    src_sd = src.model.state_dict()

    init = prepare_finetune(tmp_path / "coco", ["cell", "dog"], [7, 9])
    assert init.config.class_names == ["cell", "dog"] and init.config.category_ids == [7, 9]
    assert init.config.hidden_dim == src_cfg.hidden_dim and init.kept_classes == []
    model = build_model(init.config)
    model.load_state_dict(init.state_dict)  # strict: nothing missing, nothing unexpected
    assert model.class_embed.weight.shape == (3, src_cfg.hidden_dim)
    for k, v in src_sd.items():
        if not k.startswith("class_embed"):
            assert torch.equal(init.state_dict[k], v), k

    kept = prepare_finetune(tmp_path / "coco", ["cell", "dog"], [7, 9], keep_class_names=True, seed=5)
    assert kept.kept_classes == ["dog"]
    assert torch.equal(kept.state_dict["class_embed.weight"][1], src_sd["class_embed.weight"][2])
    assert torch.equal(kept.state_dict["class_embed.weight"][2], src_sd["class_embed.weight"][3])  # no object
    assert not torch.equal(kept.state_dict["class_embed.weight"][0], src_sd["class_embed.weight"][0])


def test_train_fine_tunes_from_a_checkpoint_with_other_classes(tmp_path):
    from detrkit.engine.train import train
    from detrkit.weights.native import load_native

    from _train_helpers import tiny_data, tiny_model, tiny_train

    src_cfg = tiny_model().with_classes(["person", "ring"], [1, 17])
    src = Detector.from_config(src_cfg)
    src.save_pretrained(tmp_path / "src")
    data = tiny_data(tmp_path / "data", 4, variant="other")  # categories 3, 17, 90
    result = train(tiny_model(hidden_dim=16), tiny_train(max_steps=2), data, None, tmp_path / "run",
                   progress=False, init_weights=tmp_path / "src", keep_class_names=True)
    sd, cfg = load_native(result.run_dir / "final")
    assert cfg.category_ids == [3, 17, 90] and cfg.hidden_dim == 32  # architecture from the checkpoint
    assert sd["class_embed.weight"].shape == (4, 32)
    # frozen parts (conv1, layer1) are exactly the checkpoint's
    assert torch.equal(sd["backbone.body.conv1.weight"], src.model.state_dict()["backbone.body.conv1.weight"])
