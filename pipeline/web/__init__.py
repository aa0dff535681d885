"""Fetching untrusted URLs and the download process that runs img2dataset's per-shard downloader."""
