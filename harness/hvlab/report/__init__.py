"""Views of a backup run, apart from the engine: `explain` (rich tables and the commands a
run ran), `geometry` (where every artifact, write and window lies in time: pure) and `draw`
(that geometry as a matplotlib picture)."""
