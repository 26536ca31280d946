"""Tokenizing a run's sources into a new store folder, in parallel processes.

Each source is read as a ``datasets.Dataset`` (``usp.data.sources``) and mapped in batches by
``usp.data.encode.Encoder`` with ``datasets.map(num_proc=...)``: the records are split into
contiguous shards, one per process, and the shards' results come back in order, so the tokens do
not depend on the number of processes. The mapped Arrow files live in a scratch folder beside
the store and are streamed into the store's flat arrays (``usp.data.store.StoreWriter``), then
deleted; nothing holds the whole corpus in memory.
"""

from __future__ import annotations

import os
import shutil
import time
import uuid
from pathlib import Path

from usp.data.encode import Encoder, check_field, vocabulary_size
from usp.data.sources import Source, load_records, quiet_datasets
from usp.data.spec import DataSpec
from usp.data.store import StoreWriter


RECORDS_PER_PROCESS = 1000  # fewer records than this per process: starting one costs more
MAP_BATCH = 256  # records per call of the encoder
WRITE_BATCH = 8192  # records per copy from the mapped Arrow files into the store


def processes(requested: int, records: int) -> int:
    """Tokenizing processes: ``requested`` (0: one per ``RECORDS_PER_PROCESS`` records, at most
    one per core), never more than there are records."""
    if requested == 0:
        requested = min(len(os.sched_getaffinity(0)), records // RECORDS_PER_PROCESS)
    return max(1, min(requested, records))


def _features(with_mask: bool):
    import datasets

    features = {"input_ids": datasets.List(datasets.Value("int64")),
                "skipped": datasets.Value("bool")}
    if with_mask:
        features["loss_mask"] = datasets.List(datasets.Value("uint8"))
    return datasets.Features(features)


def _stdlib_records():
    import datasets

    from usp.data.stdlib import stdlib_documents

    return datasets.Dataset.from_dict({"document": stdlib_documents()})


def _copy_into(writer: StoreWriter, mapped) -> int:
    """Append the mapped documents to the store; returns how many records were skipped."""
    import pyarrow.compute as compute

    skipped = 0
    for table in mapped.with_format("arrow").iter(batch_size=WRITE_BATCH):
        ids = table.column("input_ids").combine_chunks()
        lengths = compute.list_value_length(ids).to_numpy(zero_copy_only=False)
        values = ids.flatten().to_numpy(zero_copy_only=False)
        mask = None
        if writer.with_mask:
            mask = table.column("loss_mask").combine_chunks().flatten().to_numpy(
                zero_copy_only=False)
        skipped += int(compute.sum(table.column("skipped")).as_py() or 0)
        writer.append(values, lengths[lengths > 0], mask)
    return skipped


def tokenize_into(directory: Path, spec: DataSpec, sources: list[Source], tokenizer,
                  manifest_extra: dict) -> dict:
    """Tokenize every source into the new store folder ``directory``; returns its manifest (with
    ``skipped`` and the ``build`` record: seconds, tokens/s, processes). ValueError for a bad
    record, and when no document is left (the folder is then removed)."""
    scratch = directory.with_name(directory.name + ".scratch")
    start, skipped, records, used = time.perf_counter(), 0, 0, 1
    try:  # anything failing removes the unfinished store (StoreWriter's exit)
        with quiet_datasets(), StoreWriter(directory, vocabulary_size(tokenizer),
                                           with_mask=spec.effective_loss_on == "assistant"
                                           ) as writer:
            for number, source in enumerate(sources):
                dataset = _stdlib_records() if source.kind == "stdlib" else load_records(
                    source, scratch)
                if len(dataset) == 0:
                    continue
                check_field(source, dataset.column_names, spec)
                workers = processes(spec.num_proc, len(dataset))
                used = max(used, workers)
                mapped = dataset.map(
                    Encoder(source, spec, tokenizer), batched=True, with_indices=True,
                    batch_size=MAP_BATCH, num_proc=workers if workers > 1 else None,
                    remove_columns=dataset.column_names, features=_features(writer.with_mask),
                    cache_file_name=str(scratch / f"mapped-{number}.arrow"),
                    new_fingerprint=f"usp-{uuid.uuid4().hex[:16]}", load_from_cache_file=False,
                )
                skipped += _copy_into(writer, mapped)
                records += len(dataset)
                del mapped, dataset
            seconds = time.perf_counter() - start
            if writer.documents == 0:
                because = (f" ({skipped} of {records} conversations skipped: none has an "
                           "assistant turn)" if skipped else "")
                raise ValueError(f"the data holds no documents to train on{because}: "
                                 f"{', '.join(s.describe() for s in sources)}")
            build = {"seconds": round(seconds, 3),
                     "tokens_per_s": writer.tokens / max(seconds, 1e-9),
                     "processes": used, "records": records, "finished": time.time()}
            return writer.finish(skipped=skipped, build=build, **manifest_extra)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
