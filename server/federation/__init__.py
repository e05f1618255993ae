"""One federation, whatever drives it: the run spec, the flags that override it, the
topologies, and the assembly that both `peft-sim` and `peft-server run` call."""
