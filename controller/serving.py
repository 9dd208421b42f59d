"""Keeps Ray Serve serving exactly the models the store marks deployed.

The store is the truth (a Deploy is one committed update); this applies it to the Serve application through
the dashboard's REST API (serving/deployer.py), on a thread of its own: at once after a Deploy or Undeploy, again
after a failure (Ray unreachable) and when the application has vanished (a restarted Ray cluster), so serving
converges on what the store says however the controller, Ray or Serve come and go. Its own: Serve's REST API can
take minutes to answer (its controller busy or restarting), and neither the reconciler's passes (jobs started,
followed, cancelled) nor the RPCs (a Deploy answered past its caller's deadline, though recorded) may wait for it.
"""

from __future__ import annotations

import logging
import threading
import time

from controller import metrics
from controller.store import Store
from serving.deployer import ServeDeployer

log = logging.getLogger(__name__)

RETRY_INTERVAL_S = 5.0
SETTLE_INTERVAL_S = 1.0  # how often an application being deployed is looked at, until it runs or fails
# An application still DEPLOYING (or UNHEALTHY) this long after an apply has reconfigured the replicas it runs: what
# it waits for is replicas to start (a GPU node being added) or to recover, not the models' change, which a replica
# takes in moments.
RECONFIGURED_AFTER_S = 60.0


class ServingSync:
    def __init__(
        self,
        store: Store,
        deployer: ServeDeployer,
        tenant_tokens: dict[str, tuple[str, ...]],
        check_interval_s: float = 30.0,
    ):
        self.store = store
        self.deployer = deployer
        self.tenant_tokens = tenant_tokens  # the controller's; none: serving is open, like the controller
        self.check_interval_s = check_interval_s  # how often the application is checked to exist
        # The state below is the thread's own (request_apply only sets _requested and wakes it).
        self._dirty = True  # a (re)started controller applies once: the Serve app comes up with it
        self._next_check = 0.0
        self._requested = False  # an apply asked for (request_apply)
        # The model ids of the deployed set last applied (None before this controller's first apply: Serve may then
        # serve whatever a controller before it applied). Read by other threads (may_serve), replaced whole.
        self._applied: frozenset[str] | None = None
        self._applying: frozenset[str] = frozenset()  # the deployed set an apply under way gives Serve
        self._target: frozenset[str] | None = None  # the deployed set last applied, until Serve is seen running it
        self._applied_at = 0.0  # when it was
        self._woken = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="serving-sync", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        self._woken.set()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                self.reconcile()
            except Exception:
                log.exception("serving: catching up with the store failed; retrying")
            self._woken.wait(1.0)
            self._woken.clear()

    def request_apply(self) -> None:
        """Has the thread apply the store's deployed set now, without waiting for it (nor for an apply under way:
        one asked for during it comes after it, reading the store anew)."""
        self._requested = True
        self._woken.set()

    def may_serve(self, model_id: str) -> bool:
        """Whether Ray Serve may still serve the model: it is in the deployed set last applied or being applied now
        (read before an undeploy, an apply under way gives it to Serve after), or none has been applied yet. An
        undeploy is recorded at once and reaches Serve with the next apply: seconds, or as long as Serve's REST API
        does not answer."""
        # In this order: the thread adds the set it applied to _applied before it clears _applying.
        applying = self._applying
        applied = self._applied
        return applied is None or model_id in applied or model_id in applying

    def _apply(self) -> None:
        """Applies the store's deployed set now; on failure, tried again after RETRY_INTERVAL_S."""
        try:  # the store's read too: a database that failed it for a moment must not leave the change unapplied
            deployed = self.store.deployed_models()
            models = {model.model_id: model.path for model in deployed}
            self._applying = frozenset(models)
            owners = {model.model_id: model.tenant for model in deployed}
            before = self.deployer.apply(models, owners, self.tenant_tokens)
        except Exception as e:
            self._dirty, self._next_check = True, time.monotonic() + RETRY_INTERVAL_S
            self._up_to_date(False)
            log.warning("could not apply the deployed models to Ray Serve (retrying): %s", e)
            return
        finally:  # a failed apply may have reached Serve all the same: its set counts as served until the next
            self._applied = self._applied if self._applied is None else self._applied | self._applying
            self._applying = frozenset()
        # What Serve served before may still be served until it runs this set: an application that fails to deploy
        # (DEPLOY_FAILED: code that cannot take this config, say) keeps its old replicas and their models. Before this
        # controller's first apply, what it served is what the application was given before.
        self._target, self._dirty, self._applied_at = frozenset(models), False, time.monotonic()
        self._applied = (before if self._applied is None else self._applied) | self._target
        self._check()

    def _up_to_date(self, running: bool) -> None:
        metrics.SERVING_UP_TO_DATE.labels(application=self.deployer.config.app_name).set(int(running))

    def reconcile(self) -> None:
        """Applies when asked (request_apply); re-applies when a previous apply failed or the application is gone (at
        their intervals)."""
        if self._requested:
            self._requested = False  # first: a request from here on gets an apply of its own
            self._apply()
            return
        if time.monotonic() < self._next_check:
            return
        if self._dirty or not self._check():
            self._apply()

    def _check(self) -> bool:
        """Looks at the application Serve runs; False where it is gone (to be applied again). Running, it serves only
        the set last applied; failed to deploy, the log says why (each check_interval_s, until an operator acts)."""
        try:
            status = self.deployer.status()
        except Exception as e:
            log.warning("could not read Ray Serve's status (retrying): %s", e)
            self._next_check = time.monotonic() + RETRY_INTERVAL_S
            return True
        if status == "NOT_DEPLOYED":
            self._up_to_date(False)
            self._next_check = time.monotonic() + RETRY_INTERVAL_S  # if even the apply now does not bring it back
            return False
        settled = status == "RUNNING" or (
            status in ("DEPLOYING", "UNHEALTHY") and time.monotonic() - self._applied_at >= RECONFIGURED_AFTER_S
        )
        if settled:
            self._applied = self._target
        self._up_to_date(status != "DEPLOY_FAILED")
        if status == "DEPLOY_FAILED":
            try:
                why = self.deployer.message()
            except Exception as e:  # the REST API gone between the two reads
                why = f"(its reason could not be read: {e})"
            log.error(
                "Ray Serve failed to deploy the serving application; the models deployed before may still be "
                "served, and no undeployed one is deleted until it runs: %s",
                why,
            )
        interval = SETTLE_INTERVAL_S if status == "DEPLOYING" and not settled else self.check_interval_s
        self._next_check = time.monotonic() + interval
        return True
