"""Checkpoints and export on every rank: save with the data position, resume exactly, export Hugging Face."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from bert.model import BertForPreTraining
from bert.pretrain import engine as eng
from bert.pretrain.data import DataPosition
from bert.pretrain.run import CHECKPOINTS, LATEST, STATE_FILE, Run, checkpoint_tags, newest_checkpoint
from data_prep.vocab import TOKENIZER_FILES

log = logging.getLogger("bert.pretrain")


# --- checkpoints and export -----------------------------------------------------------------------------


def save_checkpoint(run: Run) -> Path:
    """A DeepSpeed checkpoint on every rank, the data position in client_state; keeps the last N complete.

    It becomes visible only when complete: rank 0 writes its STATE_FILE once every rank has saved, then
    points ``latest`` at it (each atomically), and only then deletes complete checkpoints beyond ``keep_last``.
    A kill anywhere before leaves the previous checkpoint the newest complete one, which ``resume`` takes.
    """
    engine, step = run.engine, run.engine.global_step
    checkpoint_dir = run.out / CHECKPOINTS
    tag = f"step-{step}"
    if (checkpoint_dir / tag / STATE_FILE).exists():
        # The complete checkpoint this run resumed from (and took no step since): the same state, and its
        # files may be laid out for another world size, which a second save would mix with this one's.
        return checkpoint_dir / tag
    if run.rank == 0 and (checkpoint_dir / tag).exists():
        # A save of this step that was cut short: its files may be another world size's, never mixed in.
        log.info("removing %s, a checkpoint whose save was cut short", checkpoint_dir / tag)
        shutil.rmtree(checkpoint_dir / tag)
    eng.barrier()
    state = {
        "step": step,
        "data": run.batches.position.to_dict(),
        "seed": run.config.seed,
        "global_batch_size": run.batch.global_batch_size,
        "world_size": run.world_size,
        "zero_stage": engine.zero_stage,
        "precision": engine.precision,
    }
    engine.save(checkpoint_dir, tag, {"bertpipe": state})
    eng.barrier()
    if run.rank == 0:
        from data_prep.manifest import write_json_atomic, write_text_atomic

        write_json_atomic(checkpoint_dir / tag / STATE_FILE, state)  # from here on the checkpoint is complete
        write_text_atomic(checkpoint_dir / LATEST, tag)
        for old in checkpoint_tags(checkpoint_dir)[: -run.config.keep_last]:  # complete, older than tag
            shutil.rmtree(checkpoint_dir / old, ignore_errors=True)
    eng.barrier()
    log.info("saved checkpoint %s", checkpoint_dir / tag)
    return checkpoint_dir / tag


def resume(run: Run) -> DataPosition:
    """Load the newest complete checkpoint, refusing one it cannot continue exactly; the data position to go on from.

    A checkpoint whose save was cut short (no STATE_FILE; ``latest`` empty or naming it) is passed over,
    and the one taken instead is named in the log with the reason.

    On another number of ranks the global batch must stay the same: give the global and micro batch sizes,
    and the accumulation steps follow the world size. ZeRO-0 checkpoints hold the whole optimizer state and load on any world
    size; a ZeRO-1/2/3 checkpoint's optimizer state is partitioned per rank, so it is first converted to
    DeepSpeed's universal checkpoint (one file per parameter and state, once, inside the checkpoint).
    """
    checkpoint_dir = run.out / CHECKPOINTS
    tag, why = newest_checkpoint(checkpoint_dir)
    if tag is None:
        log.warning("--resume: %s holds no complete checkpoint%s, starting from step 0", checkpoint_dir,
                    f" ({why})" if why else "")  # fmt: skip
        return DataPosition()
    if why is not None:
        log.warning("--resume: continuing from %s, the newest complete checkpoint: %s", tag, why)
        if run.rank == 0:  # so that whoever reads ``latest`` finds the checkpoint this run continues
            from data_prep.manifest import write_text_atomic

            write_text_atomic(checkpoint_dir / LATEST, tag)
    state = json.loads((checkpoint_dir / tag / STATE_FILE).read_text())
    engine = run.engine
    if state["global_batch_size"] != run.batch.global_batch_size:
        raise ValueError(
            f"checkpoint {tag} was trained with a global batch of {state['global_batch_size']}, this run asks for "
            f"{run.batch.global_batch_size} (micro {run.batch.micro_batch_size} × accumulation "
            f"{run.batch.gradient_accumulation_steps} × {run.world_size} ranks): resume with the same global batch, "
            f"e.g. --global-batch-size {state['global_batch_size']} --micro-batch-size N (the accumulation follows)"
        )
    for what, saved, now in (
        ("ZeRO stage", state["zero_stage"], engine.zero_stage),
        ("precision", state["precision"], engine.precision),
    ):
        if saved != now:
            raise ValueError(
                f"checkpoint {tag} was written with {what} {saved}, this run uses {now}: resume with the same "
                "DeepSpeed config, or start a new run with --init-from (weights only, fresh optimizer)"
            )
    load_tag, universal = tag, state["world_size"] != run.world_size and engine.zero_stage > 0
    if universal:
        error = None
        if run.rank == 0:
            try:
                eng.universal_checkpoint(checkpoint_dir, tag)
            except Exception as e:  # every rank must hear of it, not wait for a conversion that failed
                error = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
        error = eng.broadcast_object(error)
        if error is not None:
            raise ValueError(
                f"checkpoint {tag} (ZeRO-{state['zero_stage']}, {state['world_size']} ranks) could not be converted "
                f"to a universal checkpoint for {run.world_size} ranks ({error}): resume on {state['world_size']} ranks"
            )
        load_tag = f"{tag}/{eng.UNIVERSAL}"
    client_state = engine.load(checkpoint_dir, load_tag, universal=universal)
    data = client_state["bertpipe"]["data"]
    log.info(
        "resumed from %s at step %d (epoch %d, sample %d)%s",
        tag,
        engine.global_step,
        data["epoch"],
        data["cursor"],
        f" on {run.world_size} ranks, written by {state['world_size']}"
        if state["world_size"] != run.world_size
        else "",
    )
    return DataPosition(**data)


def export_hf(run: Run, checkpoint: Path) -> Path:
    """OUT/hf: config.json + model.safetensors (ZeRO partitions merged, fp32) + the tokenizer files."""
    eng.barrier()
    hf_dir = run.out / "hf"
    if run.rank == 0:
        state = run.engine.consolidated_state_dict(checkpoint.parent, checkpoint.name)
        model = BertForPreTraining(run.model_config)
        missing, unexpected = model.load_state_dict(state, strict=False)
        missing = [k for k in missing if k not in model.tied_weights]
        if missing or unexpected:
            raise RuntimeError(
                f"consolidated checkpoint does not fit the model: missing {missing}, unexpected {unexpected}"
            )
        tmp = run.out / ".hf.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp)
        write_tokenizer_files(run, tmp)
        old = run.out / ".hf.old"
        shutil.rmtree(old, ignore_errors=True)
        if hf_dir.exists():
            hf_dir.rename(old)
        tmp.rename(hf_dir)
        shutil.rmtree(old, ignore_errors=True)
        log.info("exported %s", hf_dir)
    eng.barrier()
    return hf_dir


def write_tokenizer_files(run: Run, directory: Path) -> None:
    """Copy the vocabulary's tokenizer files; write vocab.txt / tokenizer_config.json when it has none."""
    for name in TOKENIZER_FILES:
        if (run.vocab_dir / name).exists():
            shutil.copyfile(run.vocab_dir / name, directory / name)
    if not (directory / "vocab.txt").exists():
        (directory / "vocab.txt").write_text("\n".join(run.tokens) + "\n", encoding="utf-8")
    if not (directory / "tokenizer_config.json").exists():
        tokenizer_config = {
            "tokenizer_class": "BertTokenizer",
            "do_lower_case": bool(run.metadata.lowercase) if run.metadata.lowercase is not None else True,
            "model_max_length": run.model_config.max_position_embeddings,
            "unk_token": "[UNK]", "sep_token": "[SEP]", "pad_token": "[PAD]", "cls_token": "[CLS]",
            "mask_token": "[MASK]",
        }  # fmt: skip
        (directory / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")
