"""How a memory is used over a corpus: ``audit`` streams a corpus through the model (one process or a torchrun job);
``stats`` the slot counter and its statistics (counts and weight mass, merged by addition); ``hdf5`` the export and
its schema (docs/hdf5-schema.md); ``plots``; ``slot`` one slot's page; ``report`` the static report site
(``report_site/``). Uses ``memedit.lm``, ``memedit.storage`` and ``memedit.tracing``."""
