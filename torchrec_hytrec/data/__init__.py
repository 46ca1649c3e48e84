"""Parquet behaviour sequences, one module per concern (import from the module itself):

* ``batch``: :class:`SequenceBatch`, the pipelineable batch every reader yields;
* ``ranking``: :class:`RankingBatch`, the ranker's batch, and the transform from sequence batches;
* ``schema``: the Parquet layout, :class:`SequenceDatasetInfo`, :class:`Sequences`, the errors;
* ``validation``: the layout's rules, checked on decoded sequences;
* ``parquet``: reading and writing sequence files (checksummed, atomic);
* ``convert``: ``python -m torchrec_hytrec.data.convert`` from interaction logs;
* ``synthetic``: the seeded generator, ``python -m torchrec_hytrec.data.synthetic``;
* ``splits``: leave-one-out train / valid / test positions;
* ``reader``: :class:`SequenceReader`, Parquet row groups to token-bounded batches.

Nothing is imported here, so the command-line modules start without loading torch / TorchRec.
"""
