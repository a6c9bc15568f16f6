"""The runtime's behaviour as state machines without I/O: the core.

Nothing here reads a clock, opens a socket, starts a thread or touches the
file system (``tests/test_core.py`` checks the imports). Inputs are method
calls that carry what happened (and ``now`` where time matters); outputs are
return values and outboxes the caller drains. Two hosts run the same code:

::

    phalanx.driver (threads, pipes, ZeroMQ, CURVE)    phalanx.testing.sim (seeded scheduler,
      pump / callers / supervisor, under one lock  ──▶  virtual clock, simulated links)
                         │                                         │
                         └───────────▶ phalanx.core ◀──────────────┘
                    tasks     Task, Job: work in flight and where its outcomes go
                    outcomes  a worker's outcomes: credits, dedupe, late results,
                              resolution (retry, Ignore/Terminate), crash attribution,
                              restart intensity, retry timers
                    routing   tag queues, live workers per tag, credit dispatch,
                              route timeouts
                    window    the streaming map's window and its ordered buffer
                    actors    the actor lifecycle (transition table), supervision,
                              placement, what workers say about actors
                    execute   what a worker does with a task (TaskRunner, a clock given)
                    channels  the channel broker's state: leases, subscriptions, who gets
                              which message, redelivery on nack, close or death

So what the simulator checks (exactly-once delivery, bounded reading of
the input, what a crash is charged to, routing by tag) is the code that
ships. An exception escaping the core is a bug: the host breaks the runtime
with it (``RuntimeBrokenError``), it never counts it as bad input.
"""

from .outcomes import Outcomes
from .tasks import SKIPPED, Delivery, Job, Task

__all__ = ["Outcomes", "Task", "Job", "SKIPPED", "Delivery"]
