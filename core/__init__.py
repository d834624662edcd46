"""The ground floor: machinery every other package shares, importing nothing of ours.

- ``core.storage``: local paths and fsspec URLs (``s3://``, ``gs://``) behind one path type; reads, globs, uploads
- ``core.io``: atomic writes (``atomic_path``), sha256 of files, the canonical JSON spelling used for hashing
- ``core.figures``: PNG reports written atomically and byte-identically (``save_figure``)
- ``core.config``: YAML configs read safely and validated strictly (``Strict``, ``parse_config``, ``ConfigError``)
- ``core.runtime``: joining or starting Ray, gathering task results with progress (used by the jobs only)
- ``core.code_version``: the fingerprint of the code that shapes an artefact's content
- ``core.accounting``: where every input record went (``Accounting``, merged with ``+``)
- ``core.versions``: immutable, content-addressed dataset versions, their ``latest`` pointer; manifest last, then ``latest``
- ``core.manifest``: the one manifest builder and dataset card of every dataset version
"""
