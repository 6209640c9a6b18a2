"""Workload watches: which images this node will run, as its orchestrator tells it.

A watch follows an orchestrator's API (Nomad's blocking queries, Kubernetes' list and watch)
and yields the image references of every workload that can place on this node: the whole
set each time it changes, the initial set first. The prefetcher turns the set into pins
(origin ``nomad`` or ``kubernetes``), so an image is on the node before the workload lands
there, and stays usable with every registry down.

Why whole sets and not changes: a consumer that just started and one that saw every change
get the same thing, and a watch that had to start over (Kubernetes' 410 Gone, a Nomad index
that went backwards) needs no special case downstream.

Why a watch never raises for an API failure: the API server being away is exactly when the
node most needs its images, so losing it must not unpin them. A failure is logged once per
kind of failure (not once per retry), retried with capped backoff, and the last known set is
kept until the API answers again.

"Can place on this node" is an over-approximation, as a prefetcher wants it: what the
orchestrator's placement rules can rule out from the workload's spec alone (Nomad's
datacenters and node pool, Kubernetes' ``nodeSelector``) is left out; what needs the
scheduler's view (constraints, affinity, resources) is not evaluated.

- ``base``: the backoff, the once-per-kind failure log and the image-string checks both share
- ``nomad``: ``NomadWorkloads``, Nomad jobs through ``/v1/jobs`` blocking queries
- ``kubernetes``: ``KubernetesWorkloads``, Deployments, DaemonSets, StatefulSets, CronJobs
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Protocol

from mirror.prefetch.model import ImageRef
from mirror.prefetch.watch.base import Backoff
from mirror.prefetch.watch.kubernetes import KubernetesWorkloads
from mirror.prefetch.watch.nomad import NomadWorkloads

__all__ = ["Backoff", "KubernetesWorkloads", "NomadWorkloads", "WorkloadWatch"]


class WorkloadWatch(Protocol):
    """The images of the workloads that can place on this node, as they change."""

    def images(self) -> AsyncIterator[frozenset[ImageRef]]:
        """The full current set each time it changes, the initial set first; runs forever.

        The initial set comes once the API has answered (Kubernetes: once every kind was
        tried and one listed, so a kind the account may not list holds back no other);
        until then nothing is yielded. API failures never raise: they are logged, retried,
        and the last set stands.
        Closing the iterator (``aclose``) stops every request and task it started.
        """
        ...
