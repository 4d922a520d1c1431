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
    assert (family.images, family.video, family.boxes, family.write_boxes) == (True, True, False, None)
    hash(family)  # a frozen record: its model_classes mapping is left out of the hash
