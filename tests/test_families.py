"""A family's facts agree with the libraries they come from, and only its name and grid enter a build's manifest."""

import pytest

from shardkit.families import FAMILIES, MODEL_CLASSES
from shardkit.shards.manifest import FamilyInfo

FAMILY_LIST = list(FAMILIES.values())


@pytest.mark.parametrize("family", FAMILY_LIST, ids=list(FAMILIES))
def test_the_transformers_classes_of_a_family_are_its_checkpoints_own(family):
    from transformers.models.auto import image_processing_auto, modeling_auto, processing_auto

    for model_type, model_class in family.model_classes.items():
        assert modeling_auto.MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES[model_type] == model_class
        assert processing_auto.PROCESSOR_MAPPING_NAMES[model_type] == family.processor_class
    images = image_processing_auto.IMAGE_PROCESSOR_MAPPING_NAMES[next(iter(family.model_classes))]
    assert family.image_processor_class in (images.values() if isinstance(images, dict) else images)


def test_the_families_agree_on_each_checkpoint_types_class():
    for family in FAMILY_LIST:
        assert {kind: MODEL_CLASSES[kind] for kind in family.model_classes} == family.model_classes


@pytest.mark.parametrize("family", FAMILY_LIST, ids=list(FAMILIES))
def test_only_the_name_and_grid_enter_the_manifest(family):
    assert set(family.manifest_entry()) == set(FamilyInfo.model_fields)
    takes_video = not family.name.startswith(("qwen3_5", "qwen3_8"))  # Qwen3.5's video is refused (README, Video)
    assert (family.images, family.video, family.boxes) == (True, takes_video, True)
    hash(family)  # a frozen record: its model_classes mapping is left out of the hash


#: each family's box convention as its authors state it: scale and syntax (sources in README.md, "Grounding")
CONVENTIONS = {
    "qwen2_vl": ("rel1000", "tokens"),  # paper 2409.12191 2.2.1: 0-1000, <|box_start|>(x1,y1),(x2,y2)<|box_end|>
    "qwen2_5_vl": ("abs", "json"),  # spatial_understanding.ipynb: bbox_2d in pixels of the resized image
    "qwen3_vl": ("rel1000", "json"),  # 2d_grounding.ipynb: bbox_2d in 0-1000
    "qwen3_vl_hf": ("rel1000", "json"),
    # Qwen3.5 / 3.6 / 3.8: Qwen3-VL's vision stack and its convention (no authors' statement found; README)
    **dict.fromkeys(
        ["qwen3_5", "qwen3_5_disable_thinking", "qwen3_5_hf", "qwen3_8", "qwen3_8_disable_thinking"],
        ("rel1000", "json"),
    ),
}


@pytest.mark.parametrize("family", FAMILY_LIST, ids=list(FAMILIES))
def test_each_family_writes_boxes_in_its_authors_convention(family):
    assert (family.box_style.scale, family.box_style.syntax) == CONVENTIONS[family.name]


def test_a_family_that_takes_boxes_has_a_style():
    from dataclasses import replace

    with pytest.raises(ValueError, match="box_style"):
        replace(FAMILIES["qwen2_vl"], boxes=False)
    assert replace(FAMILIES["qwen2_vl"], boxes=False, box_style=None).box_style is None
