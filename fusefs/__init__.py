"""fusefs: everything below "mount this layer" — sources, format readers, index, cache, FUSE.

Flow of a read: kernel → ``ops`` (one pyfuse3 session, all layers) → ``layers`` (inode → layer,
node) → ``fetch`` (cache hit: one pread; miss: coalesced ``sources`` request → ``codecs`` decode
and verify → ``cache``). Mounting: ``manager`` (the snapshotter's entry point) → a ``sources``
factory → ``formats`` reader → ``index`` (verified ``LayerIndex``) → ``layers`` + bind mount;
``prefetch`` then warms the cache. Configuration lives in ``config``, errors in ``errors``.
Imports go one way: fusefs may use ``estargz``, never ``snapshotter``.
"""
