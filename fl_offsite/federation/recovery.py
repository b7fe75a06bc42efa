"""Recovering from data owners whose worker process dies hard in simulation.

Flower 1.41's Ray backend puts an actor back into its pool even when the actor's process is
dead (``os._exit``, an out-of-memory kill), so every later message routed to it fails too.
``RecoveringRayBackend`` replaces a dead actor with a fresh one: the message that killed it
still counts as failed, the rounds after it are whole again. Flower creates its backend by
importing ``RayBackend`` from ``raybackend`` at run time, so installing this subclass there
for the duration of a simulation is enough.
"""

from __future__ import annotations

import contextlib

import ray
from flwr.server.superlink.fleet.vce.backend import raybackend


class RecoveringRayBackend(raybackend.RayBackend):
    def process_message(self, message, context):
        pool = self.pool
        future = pool.submit(lambda a, fn, msg, cid, ctx: a.run.remote(fn, msg, cid, ctx),
                             (self.app_fn, message, str(context.node_config["partition-id"]),
                              context))
        try:
            return pool.fetch_result_and_return_actor_to_pool(future)
        except ray.exceptions.RayActorError:
            pool._future_to_actor.pop(future, None)  # dead: never reuse it
            pool.pool.append(pool.create_actor_fn())
            raise
        except Exception:
            pool.add_actor_back_to_pool(future)
            raise


@contextlib.contextmanager
def recovering_ray_backend():
    original = raybackend.RayBackend
    raybackend.RayBackend = RecoveringRayBackend
    try:
        yield
    finally:
        raybackend.RayBackend = original
