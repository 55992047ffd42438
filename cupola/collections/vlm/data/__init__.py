"""Video/image conversation data for the VLM: the JSONL format, chat template, packing, the
DataModule, and a generator of a small real video dataset."""

from cupola.collections.vlm.data.conversations import IGNORE_INDEX, prompt_ids, read_conversations
from cupola.collections.vlm.data.datamodule import PackedConversationDataset, VLMDataModule
from cupola.collections.vlm.data.synthetic import synthetic_dataset_file, write_synthetic_video_dataset

__all__ = [
    "IGNORE_INDEX",
    "PackedConversationDataset",
    "VLMDataModule",
    "prompt_ids",
    "read_conversations",
    "synthetic_dataset_file",
    "write_synthetic_video_dataset",
]
