"""The checkpoint reader: the format of a run folder, finding a run or checkpoint in it,
loading a trained model, and writing a weights-only checkpoint. Training state (optimiser,
RNG, distributed state dicts, rotation) is added on top by src/training/checkpoint.py."""

from src.checkpoint.layout import (
    CHECKPOINTS,
    FINETUNE_FILE,
    TRAIN_HINT,
    best_checkpoint,
    checkpoint_from_args,
    checkpoint_name,
    find_checkpoint,
    is_complete,
    is_finetuned,
    latest_checkpoint,
    list_checkpoints,
    newest_run,
    publish_checkpoint,
    read_pointer,
    read_state,
    resolve_checkpoint,
    resume_checkpoint,
    run_dir_of,
    start_checkpoint,
    temporary_checkpoint_dir,
    warn,
)
from src.checkpoint.load import barely_trained, describe_loaded, load_model, load_run_tokenizer
from src.checkpoint.verify import FORMAT_VERSION, checkpoint_problem
from src.checkpoint.weights import (
    read_weights,
    save_model_checkpoint,
    save_tensors,
    split_shared,
    write_state,
    write_weights,
)

__all__ = [
    "CHECKPOINTS", "FINETUNE_FILE", "FORMAT_VERSION", "TRAIN_HINT", "barely_trained",
    "best_checkpoint", "checkpoint_from_args", "checkpoint_name", "checkpoint_problem",
    "describe_loaded", "find_checkpoint", "is_complete", "is_finetuned", "latest_checkpoint",
    "list_checkpoints", "load_model", "load_run_tokenizer", "newest_run", "publish_checkpoint",
    "read_pointer", "read_state", "read_weights", "resolve_checkpoint", "resume_checkpoint",
    "run_dir_of", "save_model_checkpoint", "save_tensors", "split_shared", "start_checkpoint",
    "temporary_checkpoint_dir", "warn", "write_state", "write_weights",
]
