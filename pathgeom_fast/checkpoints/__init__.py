"""Reading and writing checkpoints: our safetensors snapshots, the Reference (x*), other
libraries' checkpoints (torch.save, Lightning, DCP, DeepSpeed ZeRO, HF/Accelerate folders),
key matching and run discovery.

One module per part: :mod:`.reader` (the reader interface, errors, parsing helpers),
:mod:`.keys` (key matching and checks), :mod:`.snapshots` (our snapshots, any safetensors),
:mod:`.torch_save` and :mod:`.lightning`, :mod:`.dcp`, :mod:`.deepspeed`, :mod:`.hf`,
:mod:`.discovery` (which files of a run look like checkpoints), :mod:`.reference`
(``Reference``, ``Checkpoint``, ``Run``, ``open_checkpoint``, ``open_run``), :mod:`.sharding`
(rank-local slices). This package re-exports their public names.
"""

from .discovery import trajectory_path
from .hf import HF_WEIGHT_FILES, HF_WEIGHT_INDEXES
from .keys import CheckpointKeyError, KeyMatch, check_state_against_model, match_keys, trainable
from .reader import FLOAT_DTYPES, CheckpointError, step_from_name
from .reference import (
    Checkpoint,
    Reference,
    Run,
    check_reference_file,
    load_state_dict,
    open_checkpoint,
    open_run,
)
from .snapshots import (
    SNAPSHOT_NAME,
    list_snapshots,
    load_snapshot,
    save_snapshot,
    snapshot_keys,
    snapshot_meta,
    snapshot_path,
)
from .torch_save import TORCH_SUFFIXES
