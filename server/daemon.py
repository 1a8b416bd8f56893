"""The daemon: cameras in, the scheduler's serving step in the middle, Redis out.

One worker thread owns the pipeline: it takes frames round-robin from the camera readers,
hands them to the planner, serves them (loaded models execute, links predict the rest) and writes every result to the
cache. A re-profiling period runs beside it (:class:`~mlink.scheduler.period_worker.PeriodWorker`:
profiling, fine-tuning and re-measuring in a worker thread, the new links and plan applied by
the pipeline thread between two batches; ``scheduler.period_worker: false`` runs it inline, and
serving waits). Only the pipeline thread changes the plan: a config reload that changes
the plan is handed to it and applied between two batches; stream-only changes go straight to
the ingest manager, which restarts only the cameras that changed.

Readers never touch that state either: after every plan (initial, period, re-plan, reload) the
worker thread publishes an immutable :class:`~mlink.server.snapshot.Snapshot` (plan, pool
figures, link matrix and accuracies, model rows), and refreshes its pool figures about once a
second; a reload publishes the new camera list. The API reads :attr:`Daemon.snapshot` only.

Startup: links and held-out tuples are taken from the link store and the site's latest profile
when they match the config; otherwise the initial phase profiles ``links.profile_frames`` frames
of the site's streams and trains them (with progress on stderr), and stores both the links and
that profile (as the site's latest), so a restart with the same config is ready without
profiling again. The HTTP API is up during that time and ``/readyz`` says why it is not ready
yet. A failing step is retried, a dead pipeline thread fails ``/healthz``
(:mod:`~mlink.server.pipeline_health`).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mlink.configs.schema import SiteConfig
from mlink.links import LinkError, LinkSet, TupleSet, node_model
from mlink.links.matrix import heldout_split
from mlink.models.assets import AssetStore, default_store
from mlink.scheduler.frame import FrameRecord
from mlink.scheduler.options import PlannerOptions
from mlink.scheduler.period_worker import PeriodWorker
from mlink.scheduler.planner import Planner
from mlink.scheduler.plans import Plan
from mlink.scheduler.profiler import link_store_dir, save_profile
from mlink.scheduler.rotation import Rotation
from mlink.scheduler.serving import FrameResult
from mlink.scheduler.site import build_pool
from mlink.server.batching import take_batch
from mlink.server.cache import ResultCache, open_cache
from mlink.server.hybrid import ProfileTap, build_rotation
from mlink.server.ingest import Ingest
from mlink.server.pipeline_health import StepGuard, health, readiness
from mlink.server.plan_request import PlanRequest
from mlink.server.profiling import NoProfileFiles, plan_stream_frames, site_frames, stored_profile
from mlink.server.reload import ReloadResult, config_from_file, config_from_text, diff, replans
from mlink.server.result_listeners import ResultListeners
from mlink.server.schedule_views import ScheduleViews
from mlink.server.snapshot import NO_LINKS, LinkViews, ServedCounts, Snapshot, link_views, model_rows
from mlink.server.stages import StageTimes

if TYPE_CHECKING:
    from mlink.server.redis_embedded import EmbeddedRedis

log = logging.getLogger("mlink.daemon")


class Daemon:
    """Owns ingest, planner, pool, links and cache for one site config."""

    def __init__(
        self,
        cfg: SiteConfig,
        config_path: Path | None = None,
        store: AssetStore | None = None,
        *,
        progress: bool = True,
        poll_s: float = 0.25,
        refresh_s: float = 1.0,
    ) -> None:
        self.cfg = cfg
        self.config_path = config_path
        self.store = store or default_store()
        self.progress = progress
        self.poll_s = poll_s
        self.refresh_s = refresh_s  # how often the worker re-publishes the pool's figures
        self.started_at = time.time()
        self.state = "starting"  # starting -> profiling -> serving -> stopped | failed
        self.error: str | None = None
        self.cache: ResultCache | None = None
        self._redis: EmbeddedRedis | None = None
        self.ingest: Ingest | None = None
        self.pool = None
        self.planner: Planner | None = None
        self.rotation: Rotation | None = None  # hybrid plans (scheduler.hybrid.enabled)
        self.periods: PeriodWorker | None = None  # re-profiling periods (beside serving, or inline)
        self.links: LinkSet | None = None
        self.frames_total: Counter[str] = Counter()
        self.outputs_total: Counter[tuple[str, str]] = Counter()
        self.results_failed = 0
        self.stages = StageTimes()  # per-stage time of the pipeline (bench.throughput reads it)
        self.reloads: Counter[str] = Counter()
        self._stop = threading.Event()
        self._requests: queue.Queue[PlanRequest] = queue.Queue()
        self.steps = StepGuard(self._stop)
        self._reload_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        # Published state: written by one assignment each, under _publish_lock (publishers
        # only; readers never take it), read by the API without locks.
        self._publish_lock = threading.Lock()
        self._links_of: Any = None  # the LinkAccuracy object self._link_views belong to
        self._link_views: LinkViews = NO_LINKS
        self._refreshed_at = 0.0
        self.served = ServedCounts()
        self.views = ScheduleViews()  # plan JSON, plan history, measured accuracy (pipeline thread)
        # Called with every snapshot just installed (worker thread): how the state reaches
        # readers outside this process. A listener that raises is logged and skipped.
        self.snapshot_listeners: list[Callable[[Snapshot], None]] = []
        self.result_listeners = ResultListeners()  # told of every stored batch (server/result_listeners.py)
        self.snapshot = Snapshot(
            version=0,
            published_at=time.time(),
            reason="start",
            cameras=tuple(s.id for s in cfg.streams),
            models=model_rows(cfg.models, None, None),
        )

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> None:
        """Open the cache and the cameras now; plan and serve on the worker thread."""
        self.cache, self._redis = open_cache(self.cfg.cache, prefix=f"mlink:{self.cfg.site}", home=self.store.home)
        self.ingest = Ingest(self.cfg.ingest, store=self.store)
        self.ingest.apply(self.cfg.streams)
        self._thread = threading.Thread(target=self._run, name="mlink-pipeline", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop every part, each even if another failed to stop (Redis last: results flush to it)."""
        self._stop.set()
        if self._thread is not None:  # profiling does not look at _stop: its result is dropped anyway
            self._thread.join(timeout if self.state == "serving" else min(timeout, 2.0))
        if self.periods is not None:
            self.periods.close(timeout)
        for part in (self.ingest, self.pool, self.cache, self._redis):
            if part is None:
                continue
            try:
                part.close()
            except Exception:
                log.exception("stopping %s failed", type(part).__name__)
        self.state = "stopped"

    def wait_ready(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.state == "serving":
                return True
            if self.state == "failed":
                return False
            time.sleep(0.1)
        return self.state == "serving"

    @property
    def plan(self) -> Plan | None:
        """The plan of the current snapshot (the one being served, as readers see it)."""
        return self.snapshot.plan

    # -- publishing --------------------------------------------------------------------------
    def _install(self, snap: Snapshot) -> None:
        """The one place a snapshot becomes visible: a single reference assignment."""
        self.snapshot = snap
        for listener in self.snapshot_listeners:
            try:
                listener(snap)
            except Exception:
                log.exception("snapshot listener %r failed; the snapshot is published in-process", listener)

    def _publish_pipeline(self, reason: str) -> Snapshot:
        """Publish the planner's and the pool's state (worker thread only, which owns them).

        The link figures are recomputed only when the planner's accuracy object changed (new
        links, fine-tuned links or new evaluation tuples); everything is built before the
        swap, outside the lock.
        """
        planner, pool = self.planner, self.pool
        if planner is None or pool is None:
            return self.snapshot
        self._refreshed_at = time.monotonic()
        if planner.accuracy is not self._links_of:
            t0 = time.perf_counter()
            try:
                self._link_views = link_views(planner)
            except Exception:  # the links' problem must not stop serving: publish without them
                log.exception("the link figures could not be computed; the snapshot has none")
                self._link_views = NO_LINKS
            self._links_of = planner.accuracy
            log.debug("link figures for the snapshot in %.3f s", time.perf_counter() - t0)
        plan = planner.plan
        try:
            changes = dict(
                plan=plan,
                **self.views.of(plan, self.rotation),
                pool=pool.metrics(),
                models=model_rows(planner.cfg.models, plan, pool),
                links=self._link_views,
                period=planner.period,
            )
        except Exception:
            log.exception("snapshot not published; readers keep version %d", self.snapshot.version)
            return self.snapshot
        with self._publish_lock:
            snap = self.snapshot.next(reason, **changes)
            self._install(snap)
        return snap

    def _publish_config(self, cfg: SiteConfig) -> Snapshot:
        """Publish the running config's camera list (after a reload applied it)."""
        with self._publish_lock:
            snap = self.snapshot.next("reload", cameras=tuple(s.id for s in cfg.streams))
            self._install(snap)
        return snap

    # -- planning ----------------------------------------------------------------------------
    def _stored_links(self, cfg: SiteConfig) -> tuple[LinkSet | None, TupleSet | None]:
        """Links and held-out tuples from disk, when they match the config's outputs."""
        try:
            tuples, path, why = stored_profile(cfg, self.store.home)
            if tuples is None:
                if path is not None:
                    log.info("%s; profiling again", why)
                return None, None
            _, heldout = heldout_split(tuples)  # the split `mlink links train` holds out, so the figures agree
            links = LinkSet.load(link_store_dir(cfg, self.store.home), expect_specs=tuples.specs)
            return links, heldout
        except LinkError as exc:
            log.warning("stored links not used (%s); profiling and training again", exc)
            return None, None

    def _build_planner(self, cfg: SiteConfig, previous: Planner | None = None) -> tuple[Any, Planner]:
        """A pool and a planner for ``cfg``, with its initial plan applied.

        On a reload that keeps the models and the device, the running pool (its loaded models
        and measured costs) and the links stay: only the budget or the scheduling changed, so
        re-selecting is all there is to do. Otherwise links come from disk or from profiling,
        and known costs seed the new pool.
        """
        same_models = (
            previous is not None
            and [m.model_dump() for m in previous.cfg.models] == [m.model_dump() for m in cfg.models]
            and previous.cfg.device == cfg.device
        )
        if previous is not None and same_models:
            pool, links, heldout = previous.pool, previous.links, previous.heldout
        else:
            links, heldout = self._stored_links(cfg)
            known = previous.pool.costs() if previous is not None and previous.cfg.device == cfg.device else None
            if previous is not None:
                previous.pool.close()  # unload everything before the new set is measured and loaded
            pool = build_pool(
                cfg,
                store=self.store,
                costs={k: v for k, v in (known or {}).items() if k in {m.name for m in cfg.models}} or None,
            )
        try:
            return pool, self._plan_on(cfg, pool, links, heldout, previous)
        except BaseException:
            if previous is None or pool is not previous.pool:
                pool.close()  # a failed apply releases what it built before anything else loads
            raise

    def _plan_on(
        self, cfg: SiteConfig, pool: Any, links: LinkSet | None, heldout: TupleSet | None, previous: Planner | None
    ) -> Planner:
        next_id = previous.plan.id + 1 if previous is not None and previous.plan is not None else 1
        options = PlannerOptions.from_site(cfg, progress=self.progress)
        planner = Planner(cfg, pool, links, heldout, options=options, first_plan_id=next_id)
        frames: Any = None
        if links is None or heldout is None:
            self.state = "profiling"
            try:
                frames = site_frames(plan_stream_frames(cfg, cfg.links.profile_frames, self.store))
            except NoProfileFiles as exc:
                log.info("%s: profiling from the live cameras instead", exc)
                frames = self._ingested_frames(cfg.links.profile_frames)
        tap = ProfileTap(frames) if frames is not None and cfg.scheduler.hybrid.enabled else None
        planner.initial(tap if tap is not None else frames)
        if links is None and planner.links is not None:
            planner.links.save(link_store_dir(cfg, self.store.home))
            if planner.profiled is not None:  # the profile those links came from: the next start reuses both
                log.info("profile stored at %s", save_profile(planner.profiled, self.store.home, cfg.site))
        self.rotation = build_rotation(cfg, planner, tap)
        return planner

    def _ingested_frames(self, n: int, timeout: float = 600.0) -> list[FrameRecord]:
        """Buffer ``n`` frames from the running cameras (live sites have no file to profile)."""
        assert self.ingest is not None
        frames: list[FrameRecord] = []
        deadline = time.monotonic() + timeout
        while len(frames) < n and time.monotonic() < deadline and not self._stop.is_set():
            f = self.ingest.next_frame(timeout=self.poll_s)
            if f is not None:
                frames.append(f)  # a record is a profiling frame too
        if len(frames) < 2:
            raise RuntimeError(f"no camera delivered frames to profile within {timeout:.0f} s")
        return frames

    def _period_worker(self, planner: Planner) -> PeriodWorker:
        def counts() -> dict[str, int]:
            drops = sum(st.drops for st in self.ingest.status().values()) if self.ingest is not None else 0
            return {"served": sum(self.frames_total.values()), "dropped": drops}

        return PeriodWorker(planner, background=planner.options.period_worker, counts=counts)

    def _apply_plan_request(self, req: PlanRequest) -> None:
        if not req.begin():
            return  # cancelled: its caller was told the previous config keeps running
        previous = self.planner
        if self.periods is not None:
            self.periods.close()  # the old planner's period in flight is dropped (it may share the pool)
        try:
            self.pool, self.planner = self._build_planner(req.cfg, previous)
            self.links = self.planner.links
        except Exception as exc:
            log.exception("reload: the new plan could not be applied; restoring the previous one")
            req.error = f"{type(exc).__name__}: {exc}"
            try:
                self.pool, self.planner = self._build_planner(self.cfg, previous)
                self.links = self.planner.links
            except Exception:
                log.exception("reload: restoring the previous plan failed too")
        finally:
            if self.planner is not None:
                self.periods = self._period_worker(self.planner)
            self._publish_pipeline("plan")  # before the reload returns: its caller sees the new plan
            self.state = "serving"
            req.finish()

    # -- the pipeline ------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            self.pool, self.planner = self._build_planner(self.cfg)
            self.links = self.planner.links
            self.periods = self._period_worker(self.planner)
            self._publish_pipeline("plan")
            self.state = "serving"
        except Exception as exc:
            log.exception("startup failed")
            self.error = f"{type(exc).__name__}: {exc}"
            self.state = "failed"
            return
        try:
            self._loop()
        except Exception as exc:
            log.exception("the pipeline thread ends: a step kept failing")
            self.error = f"{type(exc).__name__}: {exc}"
            self.state = "failed"

    def _loop(self) -> None:
        assert self.ingest is not None
        while not self._stop.is_set():
            try:
                req = self._requests.get_nowait()
            except queue.Empty:
                req = None
            if req is not None:
                self._apply_plan_request(req)
                continue
            batch = take_batch(self.ingest, self.cfg.scheduler, self.poll_s)
            if batch:
                self.steps.run(self._step, batch)
            elif self.periods is not None and self.periods.poll() is not None:
                self._on_new_plan()  # a period the worker finished, applied while no frame came
            if time.monotonic() - self._refreshed_at >= self.refresh_s:
                self._publish_pipeline("refresh")

    def _step(self, batch: list[FrameRecord]) -> None:
        """Serve ingest's records as they are; each result carries its record, and is stored
        under the record's camera and scored by its wall time (the clock ``since``/``until`` use)."""
        assert self.planner is not None and self.cache is not None and self.ingest is not None
        t0 = time.perf_counter()
        taken = time.time()
        self.stages.add("queue_wait", sum(max(taken - f.wall_time, 0.0) for f in batch), len(batch))
        self.planner.on_frames(batch, run=False)  # buffers a period's frames
        if self.periods is not None:
            self.periods.poll()  # starts a due period (worker) or applies a finished one; inline: runs it
        self._on_new_plan()
        t1 = time.perf_counter()
        self.stages.add("plan", t1 - t0, len(batch))
        results = self.planner.serve(batch)
        self.stages.add_each((f"model:{m}", sec) for r in results for m, sec in r.model_seconds.items())
        self.stages.add_each(("links", r.link_seconds) for r in results)  # per frame: its histogram too
        if self.rotation is not None:
            t1 = time.perf_counter()
            results = self.rotation.serve(results)
            self.stages.add("rotation", time.perf_counter() - t1, len(results))
        t1 = time.perf_counter()
        self._store(results)
        self.steps.committed()  # stored: a failure from here on is not retried (no result twice)
        self.stages.add("cache", time.perf_counter() - t1, len(results))
        self.stages.add_each(("end_to_end", time.time() - r.frame.wall_time) for r in results)  # capture to cache
        for r in results:
            self.frames_total[r.frame.camera] += 1
            for node, out in r.outputs.items():
                self.outputs_total[(node_model(node), out.provenance)] += 1
            self.ingest.mark_processed(r.frame.camera)
        if self.rotation is not None and self.rotation.due():
            t1 = time.perf_counter()
            self._store(self.rotation.close())  # rotating models ran: revised results
            self.stages.add("rotation", time.perf_counter() - t1, 0)
        self.served = ServedCounts.of(self.frames_total, self.outputs_total)
        self.stages.add("step", time.perf_counter() - t0, len(batch))

    def _on_new_plan(self) -> None:
        if self.rotation is not None:
            self.rotation.on_plan()  # a new plan: choose the hybrid modes (may replace the plan)
        if self.planner is not None and self.planner.plan is not self.snapshot.plan:
            self._publish_pipeline("plan")  # before any result of the new plan is stored

    def _store(self, results: list[FrameResult]) -> None:
        """Every result of a batch in one Redis round trip (the cache buffers them while Redis is down)."""
        assert self.cache is not None
        rows = [(r.frame.camera, r.to_json(), r.frame.wall_time, r.revision > 0) for r in results]
        done = self.cache.put_many(rows)
        for i, exc in done.rejected:
            self.results_failed += 1
            log.error("result of camera %s could not be stored: %s", results[i].frame.camera, exc)
        self.result_listeners(results, [row[1] for row in rows])

    # -- reload ------------------------------------------------------------------------------
    def reload_file(self, path: Path | None = None) -> ReloadResult:
        path = path or self.config_path
        if path is None:
            return ReloadResult(False, message="no config file to reload from")
        cfg = config_from_file(path)
        return cfg if isinstance(cfg, ReloadResult) else self.reload(cfg)

    def reload_text(self, text: str, source: str = "request body") -> ReloadResult:
        cfg = config_from_text(text, source, self.cfg, self.config_path)
        return cfg if isinstance(cfg, ReloadResult) else self.reload(cfg)

    def reload(self, new: SiteConfig, timeout: float = 600.0) -> ReloadResult:
        """Apply a validated config as a diff; a failure leaves the running config in place."""
        with self._reload_lock:
            old = self.cfg
            result = diff(old, new)
            changed = result.changed
            if not result.ok:
                return result
            if replans(result):
                if self.state not in ("serving",):
                    return ReloadResult(
                        False, changed=changed, message=f"the daemon is {self.state}; try again when it serves"
                    )
                req = PlanRequest(new)
                self._requests.put(req)
                if not req.wait(timeout):  # cancelled before it started: it is never applied
                    return ReloadResult(
                        False,
                        changed=changed,
                        message="the new plan did not start in time and was cancelled; the previous one keeps running",
                    )
                if req.error:
                    self.reloads["failed"] += 1
                    return ReloadResult(
                        False,
                        changed=changed,
                        message=f"the new config could not be applied: {req.error}; the previous one keeps running",
                    )
                result.replanned = True
            if "streams" in changed or "ingest" in changed:
                assert self.ingest is not None
                applied = self.ingest.apply(new.streams, new.ingest if "ingest" in changed else None)
                result.cameras = {
                    "added": applied.added,
                    "removed": applied.removed,
                    "restarted": applied.restarted,
                    "unchanged": applied.unchanged,
                }
            self.cfg = new.model_copy(update={"api": old.api, "cache": old.cache})
            self._publish_config(self.cfg)
            self.reloads["applied"] += 1
            result.message = "applied" + (
                f"; restart needed for {', '.join(result.restart_needed)}" if result.restart_needed else ""
            )
            return result

    # -- views for the API (the snapshot, Redis and ingest counters) -------------------------
    def health(self) -> tuple[bool, list[str]]:
        return health(self)

    def readiness(self) -> tuple[bool, list[str]]:
        return readiness(self)
