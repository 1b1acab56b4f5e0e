"""Reinforcement-learning searchers (stable-baselines3 agents in the layer-wise environment).

``ddpg``, ``td3``, ``sac``, ``ppo`` and ``a2c`` act in :class:`autoprune.envs.LayerwiseCompressionEnv`: one
step per channel group (and/or layer), one episode per candidate, so the candidate budget ``n_trials`` is the
number of episodes. The environment scores each episode's candidate through ``problem.evaluate`` (the same
evaluator as every other searcher) and enforces the budget with its legal-action clipping; the final
candidate of every episode is recorded as a trial.

**DDPG follows AMC's recipe** (ALGORITHMS.md §1.5), with these pieces:

* warm-up: ``warmup_episodes`` episodes of uniform random actions (SB3's ``learning_starts`` in steps);
* exploration: :class:`TruncatedNormalDecayNoise`, a truncated normal around the actor's action on the action
  box with ``σ = max(σ_min, σ₀ · decay^(episode − warm-up))``; AMC's ``σ₀ = 0.5`` is on [0, 1], i.e. ``1.0`` on
  SB3's [−1, 1], and the YAML values (``noise_sigma``, ``noise_min``) are given in AMC's [0, 1] units; AMC has
  no floor (``noise_min: 0``);
* reward baseline: :class:`MovingAverageBaseline` subtracts ``b`` from the terminal reward the agent learns
  from and then updates ``b ← b + α(r − b)`` (α = 0.5; the recorded trial keeps the raw reward). AMC
  subtracts the moving average of the batch mean at update time; with a terminal-only reward and γ = 1 this
  per-episode form shifts the same targets;
* actor/critic 300×300 with separate learning rates 1e-4/1e-3: :class:`AMCDDPG` overrides SB3's
  ``_update_learning_rate`` (SB3 2.x drives both optimizers from one schedule), replay memory
  ``buffer_episodes`` × episode length, batch 64, τ = 0.01, γ = 1, one gradient step per transition.

TD3 uses the same exploration noise (so that comparisons isolate the learner); SAC explores through its
entropy; PPO and A2C collect ``rollout_episodes`` whole episodes per update.

Hyper-parameters come from ``agents/hyperparams/<algo>.yaml`` (``yaml.safe_load``), overridden by keyword
arguments. Keys that are not SB3 constructor arguments: ``warmup_episodes``, ``buffer_episodes``,
``rollout_episodes``, ``net_arch``, ``critic_lr``, ``noise_sigma``, ``noise_decay``, ``noise_min``,
``preset`` (``default``: the files as they are; ``amc``: AMC's recipe, i.e. the files with AMC's action map
``action_center: middle``, no self-imitation and no noise floor; applied before the other keys, see
:data:`PRESETS`),
``reward_baseline`` (α, or ``null`` for none), ``save_every`` (episodes between checkpoints), ``mode``
(environment mode; unset, it follows the search space: ``joint`` when the space holds channel groups and layer
bits, see :func:`env_mode`), ``legal_actions`` and ``action_center`` (``middle``: AMC's action map, an action of 0
keeps the middle of [min_ratio, 1]; ``uniform``: an action of 0 keeps the uniform keep ratio that meets the budget).

**Resume.** The agent (SB3 ``save``), its replay buffer (off-policy) and the reward baseline are saved in the
store's artifact directory every ``save_every`` episodes and when the run ends; their paths are kept in the
study's state. A new searcher on the same store loads them, continues learning (``reset_num_timesteps=False``,
so a finished warm-up is not repeated) and records trials from the next number on. RL searchers are not
bit-for-bit reproducible across a resume (the agent is re-seeded from ``(seed, trials so far)``).
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import logging
import os
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import gymnasium as gym
import numpy as np
from stable_baselines3 import A2C, DDPG, PPO, SAC, TD3
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.noise import ActionNoise
from stable_baselines3.common.off_policy_algorithm import OffPolicyAlgorithm
from stable_baselines3.common.utils import update_learning_rate
from stable_baselines3.common.vec_env import DummyVecEnv

from autoprune.errors import AutoPruneError, ConfigError
from autoprune.problem import Problem
from autoprune.types import Candidate, CostReport, EvalResult
from autoprune.utils import atomic_path
from autoprune.workers import pid_alive

from .base import SEARCHERS, Searcher, derive_seed, load_hyperparams

if TYPE_CHECKING:
    import torch
    from stable_baselines3.common.vec_env import VecEnv

log = logging.getLogger("autoprune.agents.rl")

# ---------------------------------------------------------------------------------------------------------
# AMC pieces as SB3 / Gymnasium extensions


class TruncatedNormalDecayNoise(ActionNoise):
    """AMC's exploration: a truncated normal around the action, σ decaying per episode after the warm-up, down to
    an optional floor.

    SB3 adds ``noise()`` to the action and clips; a *truncated* normal needs the action itself, so algorithms
    that know this class (:class:`AMCDDPG`, :class:`AMCTD3`) call :meth:`perturb` instead. Called plainly
    (other algorithms), it returns an untruncated normal sample with the current σ.

    Args:
        size: Action dimension.
        sigma: σ₀ in SB3's [−1, 1] action units.
        decay: Factor per episode after the warm-up.
        warmup_episodes: Episodes before the decay starts.
        sigma_min: Floor of σ in SB3's units (0: none, AMC's).
        low: Lower bound of the action box.
        high: Upper bound of the action box.
        seed: Seed of the noise generator.
    """

    #: Class default, so that an agent checkpoint pickled before the floor existed loads with none.
    sigma_min: float = 0.0

    def __init__(self, size: int, sigma: float = 1.0, decay: float = 0.95, warmup_episodes: int = 0,
                 low: float = -1.0, high: float = 1.0, seed: int | None = None, sigma_min: float = 0.0) -> None:
        super().__init__()
        if sigma <= 0 or not 0 < decay <= 1 or not 0 <= sigma_min <= sigma:
            raise ConfigError(f"noise needs sigma > 0, decay in (0, 1] and 0 <= noise_min <= noise_sigma, got "
                              f"sigma {sigma}, decay {decay}, minimum {sigma_min} (SB3 units)",
                              hint="e.g. noise_sigma: 0.5, noise_decay: 0.95, noise_min: 0.05 (AMC's [0, 1] units)")
        self.size = int(size)
        self.sigma0 = float(sigma)
        self.decay = float(decay)
        self.sigma_min = float(sigma_min)
        self.warmup_episodes = int(warmup_episodes)
        self.low, self.high = float(low), float(high)
        self.episode = 0
        self.rng = np.random.default_rng(seed)

    @property
    def sigma(self) -> float:
        """Current σ: ``max(σ_min, σ₀ · decay^max(0, episode − warm-up))``."""
        return max(self.sigma_min, self.sigma0 * self.decay ** max(0, self.episode - self.warmup_episodes))

    def __call__(self) -> np.ndarray:
        return self.rng.normal(0.0, self.sigma, self.size).astype(np.float32)

    def perturb(self, action: np.ndarray) -> np.ndarray:
        """A sample of N(action, σ²) truncated to [low, high], per component (rejection sampling)."""
        a = np.asarray(action, dtype=np.float64)
        out = a.copy()
        todo = np.ones(a.shape, dtype=bool)
        for _ in range(64):
            draw = self.rng.normal(a, self.sigma)
            ok = todo & (draw >= self.low) & (draw <= self.high)
            out[ok] = draw[ok]
            todo &= ~ok
            if not todo.any():
                break
        out[todo] = np.clip(a[todo], self.low, self.high)
        return out.astype(np.float32)

    def reset(self) -> None:
        """End of an episode: one more decay step."""
        self.episode += 1

    def __repr__(self) -> str:
        return (f"TruncatedNormalDecayNoise(sigma0={self.sigma0}, decay={self.decay}, sigma_min={self.sigma_min}, "
                f"warmup_episodes={self.warmup_episodes}, episode={self.episode})")


class _TruncatedNoiseMixin:
    """Overrides SB3's action sampling so that :class:`TruncatedNormalDecayNoise` is truncated at the box."""

    def _sample_action(self, learning_starts: int, action_noise: ActionNoise | None = None, n_envs: int = 1
                       ) -> tuple[np.ndarray, np.ndarray]:
        if not isinstance(action_noise, TruncatedNormalDecayNoise):
            return super()._sample_action(learning_starts, action_noise, n_envs)  # type: ignore[misc]
        action, buffer_action = super()._sample_action(learning_starts, None, n_envs)  # type: ignore[misc]
        if self.num_timesteps < learning_starts:  # type: ignore[attr-defined]
            return action, buffer_action  # warm-up: uniform random actions, no noise
        buffer_action = action_noise.perturb(buffer_action)
        return self.policy.unscale_action(buffer_action), buffer_action  # type: ignore[attr-defined]


class _SelfImitationMixin:
    """Self-imitation of the best episodes so far (after Oh et al., 2018, "Self-Imitation Learning").

    The agent keeps the ``elite_episodes`` episodes with the highest raw reward (warm-up included: their
    observations and the actions it took, in SB3's [−1, 1] units) and, after each of DDPG's/TD3's gradient steps,
    takes one more actor step on ``imitation_weight · ‖π(s) − a‖²`` over the elite transitions. The critic's
    gradient still shapes the actor; the exploration noise then searches around what has scored best instead of
    around a policy that, learned from a terminal-only reward, settles below the best warm-up episode
    (ALGORITHMS.md §1.5). ``elite_episodes: 0`` turns it off (AMC's recipe). The elites are saved with the agent.
    """

    #: Class defaults, so that an agent pickled before self-imitation existed loads with it off.
    elite_episodes: int = 0
    imitation_weight: float = 1.0

    def __init__(self, *args: Any, elite_episodes: int = 0, imitation_weight: float = 1.0, **kwargs: Any) -> None:
        if int(elite_episodes) < 0 or float(imitation_weight) < 0:
            raise ConfigError(f"self-imitation needs elite_episodes >= 0 and imitation_weight >= 0, got "
                              f"{elite_episodes} and {imitation_weight}",
                              hint="e.g. elite_episodes: 5, imitation_weight: 1.0 (elite_episodes: 0 turns it off)")
        self.elite_episodes = int(elite_episodes)
        self.imitation_weight = float(imitation_weight)
        self.elites: list[tuple[float, np.ndarray, np.ndarray]] = []
        self._episode_obs: list[np.ndarray] = []
        self._episode_actions: list[np.ndarray] = []
        super().__init__(*args, **kwargs)

    def _setup_learn(self, *args: Any, **kwargs: Any) -> Any:
        # learning (re)starts with a new episode: drop the part of one a checkpoint may hold
        self._episode_obs, self._episode_actions = [], []
        return super()._setup_learn(*args, **kwargs)  # type: ignore[misc]

    def _store_transition(self, replay_buffer: Any, buffer_action: np.ndarray, new_obs: Any, reward: np.ndarray,
                          dones: np.ndarray, infos: list[dict[str, Any]]) -> None:
        if self.elite_episodes > 0:
            self._episode_obs.append(np.array(self._last_obs[0], dtype=np.float32))  # type: ignore[attr-defined]
            self._episode_actions.append(np.array(buffer_action[0], dtype=np.float32))
            if dones[0]:
                raw = float(infos[0].get("raw_reward", reward[0]))
                self.add_elite(raw, np.stack(self._episode_obs), np.stack(self._episode_actions))
                self._episode_obs, self._episode_actions = [], []
        super()._store_transition(replay_buffer, buffer_action, new_obs, reward, dones, infos)  # type: ignore[misc]

    def add_elite(self, reward: float, observations: np.ndarray, actions: np.ndarray) -> None:
        """Offer a finished episode to the elite set (kept: the ``elite_episodes`` highest rewards, ties to the
        earlier episode)."""
        if not np.isfinite(reward):
            return
        self.elites.append((float(reward), observations, actions))
        self.elites.sort(key=lambda e: -e[0])
        del self.elites[self.elite_episodes:]

    def imitation_loss(self) -> torch.Tensor | None:
        """``imitation_weight`` × the mean squared distance of the actor's actions to the elites' (``None``
        without elites)."""
        if not self.elites or self.elite_episodes == 0 or self.imitation_weight == 0:
            return None
        import torch

        obs = torch.as_tensor(np.concatenate([e[1] for e in self.elites]), device=self.device)  # type: ignore[attr-defined]
        act = torch.as_tensor(np.concatenate([e[2] for e in self.elites]), device=self.device)  # type: ignore[attr-defined]
        return self.imitation_weight * torch.nn.functional.mse_loss(self.actor(obs), act)  # type: ignore[attr-defined]

    def train(self, gradient_steps: int, batch_size: int = 100) -> None:
        super().train(gradient_steps, batch_size)  # type: ignore[misc]
        for _ in range(gradient_steps):
            loss = self.imitation_loss()
            if loss is None:
                return
            self.actor.optimizer.zero_grad()  # type: ignore[attr-defined]
            loss.backward()
            self.actor.optimizer.step()  # type: ignore[attr-defined]


class AMCDDPG(_SelfImitationMixin, _TruncatedNoiseMixin, DDPG):
    """SB3 DDPG with AMC's separate actor and critic learning rates and truncated-normal exploration.

    Args:
        *args: As :class:`stable_baselines3.DDPG`.
        actor_lr: Actor learning rate (the critic uses ``learning_rate``).
        **kwargs: As :class:`stable_baselines3.DDPG`.
    """

    def __init__(self, *args: Any, actor_lr: float = 1e-4, **kwargs: Any) -> None:
        self.actor_lr = float(actor_lr)
        super().__init__(*args, **kwargs)

    def _update_learning_rate(self, optimizers: list[torch.optim.Optimizer] | torch.optim.Optimizer) -> None:
        super()._update_learning_rate(optimizers)  # critic (and, for now, actor) at learning_rate
        update_learning_rate(self.actor.optimizer, self.actor_lr)
        self.logger.record("train/actor_learning_rate", self.actor_lr)


class AMCTD3(_SelfImitationMixin, _TruncatedNoiseMixin, TD3):
    """SB3 TD3 with the truncated-normal decaying exploration noise."""


class MovingAverageBaseline(gym.Wrapper):
    """Subtracts a moving-average baseline from the terminal reward (AMC's variance reduction).

    The agent sees ``r − b`` at the end of an episode, then ``b ← b + α(r − b)``; ``b`` starts at the first
    episode's reward. Intermediate rewards pass unchanged; the raw reward stays in ``info["raw_reward"]``.

    Args:
        env: The environment.
        alpha: Update rate α.
        baseline: Initial baseline (``None``: the first episode's reward).
    """

    def __init__(self, env: gym.Env, alpha: float = 0.5, baseline: float | None = None) -> None:
        super().__init__(env)
        if not 0 < alpha <= 1:
            raise ConfigError(f"reward_baseline alpha must be in (0, 1], got {alpha}")
        self.alpha = float(alpha)
        self.baseline = baseline

    def step(self, action: Any) -> tuple[Any, float, bool, bool, dict[str, Any]]:
        obs, reward, terminated, truncated, info = self.env.step(action)
        if terminated or truncated:
            r = float(reward)
            if self.baseline is None:
                self.baseline = r
            shaped = r - self.baseline
            self.baseline += self.alpha * (r - self.baseline)
            info = dict(info)
            info["raw_reward"] = r
            reward = shaped
        return obs, float(reward), terminated, truncated, info


class _GuardedProblem:
    """The searcher's problem as the environment sees it: a failed evaluation becomes a scored failure.

    An evaluation that raises (a diverging fine-tune, a forward that fails, a per-trial timeout) would
    otherwise escape from the environment's ``step`` and end the whole search. Here it returns a result with
    accuracy 0 and ``extra["failed"]`` holding the reason; :class:`_EpisodeRecorder` then gives the agent the
    objective's failure reward and records the trial as ``failed``. User errors (:class:`AutoPruneError`)
    still propagate.
    """

    def __init__(self, problem: Problem) -> None:
        self._problem = problem

    def __getattr__(self, name: str) -> Any:
        return getattr(self._problem, name)

    def evaluate(self, candidate: Candidate, **kwargs: Any) -> tuple[EvalResult, CostReport]:
        try:
            return self._problem.evaluate(candidate, **kwargs)
        except AutoPruneError:
            raise
        except Exception as exc:
            reason = f"{type(exc).__name__}: {exc}"
            return (EvalResult(accuracy=0.0, loss=float("nan"), extra={"failed": reason}),
                    self._problem.cost(candidate))


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _atomic_save(path: Path, save: Callable[[Path], object]) -> str:
    """Write ``path`` through ``save(tmp_path)`` then ``os.replace`` (a kill never leaves half a file;
    :func:`autoprune.utils.atomic_path`: the temporary name ends ``.<pid>.tmp<suffix>``).

    Returns:
        The SHA-256 of the written file.
    """
    with atomic_path(path, fsync=True) as tmp:
        save(tmp)
        digest = _sha256(tmp)
    return digest


def _remove_stale_checkpoints(directory: Path, *, keep: set[Path], also: set[Path]) -> None:
    """Delete checkpoint files the store no longer points at: older checkpoints (``also``, and any left by a
    process killed between switching the store's state and deleting them) and temporary files of writers that
    no longer run."""
    for path in [*directory.iterdir(), *also]:
        if path in keep or not path.is_file():
            continue
        name = path.name
        if name.startswith((".agent-", ".replay_buffer-")) and ".tmp" in name:
            parts = name.split(".")
            pid = int(parts[-3]) if len(parts) >= 3 and parts[-3].isdigit() else None
            if pid is not None and pid != os.getpid() and pid_alive(pid):
                continue  # another process is writing it right now
        elif not (name.startswith(("agent-", "replay_buffer-")) or path in also):
            continue
        with contextlib.suppress(OSError):
            path.unlink()


class _EpisodeRecorder(gym.Wrapper):
    """Records every finished episode's candidate as a trial of the searcher."""

    def __init__(self, env: gym.Env, searcher: RLSearcher) -> None:
        super().__init__(env)
        self.searcher = searcher
        self._started = time.perf_counter()

    def reset(self, **kwargs: Any) -> tuple[Any, dict[str, Any]]:
        self._started = time.perf_counter()
        return self.env.reset(**kwargs)

    def step(self, action: Any) -> tuple[Any, float, bool, bool, dict[str, Any]]:
        obs, reward, terminated, truncated, info = self.env.step(action)
        if (terminated or truncated) and "candidate" in info:
            failed = (info.get("eval", {}).get("extra") or {}).get("failed")
            if failed:  # the agent learns the objective's penalty for a candidate that could not be scored
                reward = self.searcher.failure_value()
                info = {**info, "reward": reward, "failed": failed}
            self.searcher.record_episode(info, self._started)
        return obs, reward, terminated, truncated, info


class _SearchCallback(BaseCallback):
    """Stops learning when the searcher should stop; checkpoints after every ``save_every`` episodes."""

    def __init__(self, searcher: RLSearcher) -> None:
        super().__init__()
        self.searcher = searcher
        self._save_pending = False
        self._stop_next = False

    def _on_training_start(self) -> None:
        # SB3 resets the action noise when learning starts; one noise episode per counted trial instead.
        self.searcher.sync_noise()

    def _on_step(self) -> bool:
        if self._stop_next:
            return False
        if self._save_pending:  # one step after an episode ended, so its last transition is stored
            self.searcher.checkpoint()
            self._save_pending = False
        if np.any(self.locals.get("dones", False)):
            # Let SB3 store the terminal transition (and train on it) first; stop at the next step.
            self._save_pending = self.searcher.due_for_checkpoint()
            self._stop_next = self.searcher.should_stop()
            return True
        return not self.searcher.should_stop()


# ---------------------------------------------------------------------------------------------------------
# The searchers

def _init_params(cls: type) -> set[str]:
    """Named constructor parameters of ``cls``, following ``**kwargs`` up the class hierarchy."""
    names: set[str] = set()
    for klass in cls.__mro__:
        if "__init__" not in vars(klass):
            continue
        params = inspect.signature(vars(klass)["__init__"]).parameters.values()
        names |= {p.name for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
        if not any(p.kind == p.VAR_KEYWORD for p in params):
            break
    return names


PRESETS: dict[str, dict[str, Any]] = {
    # the hyper-parameter files as they are: AMC's recipe with the action map centred on the budget-meeting
    # uniform keep ratio (rl_center.md: DDPG's last 30 proposals 55.6 % val instead of 23.3 %)
    "default": {},
    # AMC's own recipe (ALGORITHMS.md §1.5): the same files with AMC's action map, centred on [min_ratio, 1],
    # no self-imitation of the best episodes and no floor under the exploration noise
    "amc": {"action_center": "middle", "elite_episodes": 0, "noise_min": 0.0},
}

_SPECIAL = ("preset", "warmup_episodes", "buffer_episodes", "rollout_episodes", "net_arch", "critic_lr",
            "noise_sigma", "noise_decay", "noise_min", "reward_baseline", "save_every", "mode", "legal_actions",
            "action_center")


def env_mode(space: Any, asked: Any, searcher: str) -> str:
    """The environment mode for a search space: what it holds (``prune`` for channel groups only, ``quantize`` for
    layer bits only, ``joint`` for both) unless the user asked for a mode; a mode that leaves out part of what the
    space holds is logged as a warning (the decisions it leaves out stay at the dense width / the highest bits).

    Raises:
        ConfigError: ``asked`` is not a mode name.
    """
    from autoprune.envs.layerwise import MODES

    holds = "joint" if space.groups and space.layers else "quantize" if space.layers else "prune"
    if asked is None:
        return holds
    mode = str(asked)
    if mode not in MODES:
        raise ConfigError(f"unknown environment mode {mode!r} for searcher {searcher!r}",
                          hint=f"choices: {', '.join(MODES)}; leave `mode` unset to search what the space holds "
                          f"({holds})")
    left = [what for what, n, used in (("channel groups", len(space.groups), mode != "quantize"),
                                       ("layer bit-widths", len(space.layers), mode != "prune")) if n and not used]
    if left:
        log.warning("%s: mode %r leaves out the search space's %s (searched: only what mode %r decides; "
                    "unset `mode` to search all of it as %r)", searcher, mode, " and ".join(left), mode, holds)
    return mode


class RLSearcher(Searcher):
    """Common machinery of the SB3 searchers (subclasses name the algorithm).

    Args:
        problem: The compression problem.
        **kwargs: :class:`~autoprune.agents.base.Searcher` arguments and hyper-parameters (see the module
            docstring); defaults from ``agents/hyperparams/<name>.yaml``.
    """

    algo_cls: ClassVar[type[BaseAlgorithm]]
    deterministic = False

    def __init__(self, problem: Problem, **kwargs: Any) -> None:
        base_names = set(inspect.signature(Searcher.__init__).parameters) - {"self", "problem"}
        base = {k: v for k, v in kwargs.items() if k in base_names}
        user = {k: v for k, v in kwargs.items() if k not in base_names}
        hp = load_hyperparams(self.name)
        file_preset = hp.pop("preset", None)
        preset = str(user.pop("preset", None) or file_preset or "default")
        if preset not in PRESETS:
            raise ConfigError(f"unknown preset {preset!r} for searcher {self.name!r}",
                              hint=f"choices: {', '.join(PRESETS)} (amc: AMC's recipe with its own action map)")
        allowed = _init_params(self.algo_cls) - {"self", "policy", "env", "seed", "action_noise", "learning_starts",
                                                 "buffer_size", "n_steps", "verbose", "_init_setup_model"}
        # a preset sets what this algorithm has (AMC's recipe turns self-imitation off where there is one)
        hp = {**hp, **{k: v for k, v in PRESETS[preset].items() if k in allowed or k in _SPECIAL}, **user}
        self.preset = preset
        super().__init__(problem, **base)
        unknown = sorted(set(hp) - allowed - set(_SPECIAL))
        if unknown:
            raise ConfigError(f"unknown hyper-parameter(s) {unknown} for searcher {self.name!r}",
                              hint=f"special keys: {', '.join(_SPECIAL)}; SB3 {self.algo_cls.__name__} takes: "
                              f"{', '.join(sorted(allowed))}")
        self.hp = hp
        self.mode = env_mode(problem.space, hp.get("mode"), self.name)
        self.save_every = max(1, int(hp.get("save_every", 1)))
        self.model: BaseAlgorithm | None = None
        self._baseline_env: MovingAverageBaseline | None = None
        self._noise: TruncatedNormalDecayNoise | None = None
        self._episode_len = 0
        self._since_save = 0
        self.resumed_from: dict[str, Any] = {}

    # -- environment and agent -----------------------------------------------------------------------
    def make_env(self) -> gym.Env:
        """The environment with the episode recorder (and the reward baseline, when configured)."""
        from autoprune.envs import LayerwiseCompressionEnv

        env: gym.Env = LayerwiseCompressionEnv(_GuardedProblem(self.problem), mode=self.mode,
                                               reward=self.objective.reward,
                                               reward_kwargs=dict(self.objective.kwargs), budget=self.budget,
                                               legal_actions=bool(self.hp.get("legal_actions", True)),
                                               action_center=str(self.hp.get("action_center", "middle")))
        self._episode_len = env.episode_length
        env = _EpisodeRecorder(env, self)
        alpha = self.hp.get("reward_baseline")
        if alpha is not None:
            saved = self.store.load_state(self.name, self.seed, "reward_baseline")
            env = self._baseline_env = MovingAverageBaseline(env, float(alpha), saved)
        return env

    def _paths(self, episodes: int) -> tuple[Path, Path]:
        """New, unique checkpoint file names (a checkpoint never overwrites the one the store points at)."""
        d = self.store.artifact_dir(self.name, self.seed)
        tag = f"{episodes}-{uuid.uuid4().hex[:8]}"
        return d / f"agent-{tag}.zip", d / f"replay_buffer-{tag}.pkl"

    def _sb3_kwargs(self, env: gym.Env) -> dict[str, Any]:
        kw = {k: v for k, v in self.hp.items() if k not in _SPECIAL}
        kw.setdefault("device", "cpu")
        arch = self.hp.get("net_arch")
        if arch is not None:
            kw["policy_kwargs"] = {**kw.get("policy_kwargs", {}), "net_arch": list(arch)}
        if issubclass(self.algo_cls, OffPolicyAlgorithm):
            kw["learning_starts"] = int(self.hp.get("warmup_episodes", 0)) * self._episode_len
            kw["buffer_size"] = max(1, int(self.hp.get("buffer_episodes", 100))) * self._episode_len
            if "critic_lr" in self.hp:
                kw["learning_rate"] = float(self.hp["critic_lr"])
        else:
            kw["n_steps"] = max(1, int(self.hp.get("rollout_episodes", 4))) * self._episode_len
            if "batch_size" in _init_params(self.algo_cls):
                kw.setdefault("batch_size", kw["n_steps"])
        return kw

    def _make_noise(self, env: gym.Env) -> TruncatedNormalDecayNoise | None:
        if "noise_sigma" not in self.hp:
            return None
        dim = int(np.prod(env.action_space.shape))
        noise = TruncatedNormalDecayNoise(dim, sigma=2.0 * float(self.hp["noise_sigma"]),  # [0,1] → [-1,1]
                                          decay=float(self.hp.get("noise_decay", 0.95)),
                                          warmup_episodes=int(self.hp.get("warmup_episodes", 0)),
                                          seed=derive_seed(self.seed, 10_000_019),
                                          sigma_min=2.0 * float(self.hp.get("noise_min", 0.0)))
        return noise

    def make_agent(self, env: gym.Env) -> BaseAlgorithm:
        """A new agent, or the saved one when the study already has a checkpoint."""
        venv = DummyVecEnv([lambda: env])
        state = self.store.load_state(self.name, self.seed, "agent") or {}
        model = self._load_agent(state, venv) if state.get("agent") else None
        if model is not None:
            model.set_random_seed(derive_seed(self.seed, self.n_done))
            self.resumed_from = state
        else:
            kw = self._sb3_kwargs(env)
            noise = self._make_noise(env)
            if noise is not None:
                kw["action_noise"] = noise
            model = self.algo_cls("MlpPolicy", venv, seed=self.seed, verbose=0, **kw)
            self.resumed_from = {}
        noise = getattr(model, "action_noise", None)
        self._noise = noise if isinstance(noise, TruncatedNormalDecayNoise) else None
        return model

    def _verified(self, state: dict[str, Any], key: str) -> Path | None:
        """The checkpoint file ``state[key]`` if it exists and matches its recorded SHA-256, else ``None``."""
        path = Path(state[key])
        want = state.get(f"{key}_sha256")
        if not path.is_file():
            log.warning("%s: checkpoint %s is missing; the agent is rebuilt", self.name, path)
            return None
        if want is None or _sha256(path) != want:
            log.warning("%s: checkpoint %s does not match its recorded checksum (truncated or changed); "
                        "it is not loaded and the agent is rebuilt", self.name, path)
            return None
        return path

    def _load_agent(self, state: dict[str, Any], venv: VecEnv) -> BaseAlgorithm | None:
        """The saved agent (and replay buffer), or ``None`` when it is missing, tampered with or unreadable.

        SB3 checkpoints hold pickled Python objects, so only files whose SHA-256 matches the one this searcher
        recorded in the store when it wrote them are loaded.
        """
        agent = self._verified(state, "agent")
        if agent is None:
            return None
        try:
            model = self.algo_cls.load(str(agent), env=venv, device=self.hp.get("device", "cpu"))
            if isinstance(model, OffPolicyAlgorithm) and state.get("replay"):
                replay = self._verified(state, "replay")
                if replay is not None:
                    model.load_replay_buffer(str(replay))
        except Exception as exc:  # a checkpoint of another SB3 version, a corrupt zip: start over
            log.warning("%s: cannot load checkpoint %s (%s); the agent is rebuilt", self.name, agent, exc)
            return None
        return model

    def sync_noise(self) -> None:
        """Set the exploration noise's episode to the number of counted trials (one episode per trial)."""
        if self._noise is not None:
            self._noise.episode = self.n_done

    # -- hooks called from the environment and the SB3 callback --------------------------------------
    def record_episode(self, info: dict[str, Any], started: float) -> None:
        """Record the final candidate of an episode (called by the recorder wrapper)."""
        if self._stop_event.is_set() or (self.n_trials is not None and self.n_done >= self.n_trials):
            return  # an episode SB3 finished after the search was told to stop
        ev = dict(info["eval"])
        result = EvalResult(accuracy=ev["accuracy"], loss=ev["loss"], seconds=ev.get("seconds", 0.0),
                            samples=ev.get("samples", 0), evaluator=ev.get("evaluator", ""),
                            extra=ev.get("extra") or {}, score=ev.get("score"))
        trial = self.new_trial()
        extra = {"episode": self.n_done, "legalized": bool(info.get("legalized", False))}
        if self._noise is not None:
            extra["noise_sigma"] = self._noise.sigma
        candidate = Candidate.from_dict(info["candidate"])
        if info.get("failed"):
            self.record_failure(trial, candidate, started, str(info["failed"]), extra)
        else:
            self.evaluate_and_record(trial, candidate, started=started, result=result, reward=float(info["reward"]),
                                     extra=extra)
        self._since_save += 1

    def due_for_checkpoint(self) -> bool:
        """True when ``save_every`` episodes were recorded since the last checkpoint."""
        return self._since_save >= self.save_every

    def checkpoint(self) -> None:
        """Save the agent, its replay buffer and the reward baseline; remember their paths in the store.

        A run that trained nothing (its study already held ``n_trials``) saves nothing but still removes the
        checkpoint files the store does not point at: a process killed while deleting its older checkpoints
        leaves them, and with nothing left to search no later checkpoint would.
        """
        if self.study is None:
            return
        if self.model is None:
            self._remove_unreferenced_checkpoints()
            return
        agent_path, replay_path = self._paths(self.n_done)
        previous = self.store.load_state(self.name, self.seed, "agent") or {}
        model = self.model
        state: dict[str, Any] = {"agent": str(agent_path), "episodes": self.n_done,
                                 "num_timesteps": int(model.num_timesteps)}
        # Each file is written under a new name (temporary, fsync'ed, renamed); the store's state switches to it
        # (with the checksums) in one write, and only then the previous files go. A kill at any point leaves the
        # store pointing at a complete checkpoint.
        state["agent_sha256"] = _atomic_save(agent_path, lambda p: model.save(p))
        if isinstance(model, OffPolicyAlgorithm):
            state["replay_sha256"] = _atomic_save(replay_path, lambda p: model.save_replay_buffer(p))
            state["replay"] = str(replay_path)
        self.store.save_state(self.name, self.seed, "agent", state)
        _remove_stale_checkpoints(agent_path.parent, keep={agent_path, replay_path},
                                  also={Path(previous[k]) for k in ("agent", "replay") if previous.get(k)})
        if self._baseline_env is not None and self._baseline_env.baseline is not None:
            self.store.save_state(self.name, self.seed, "reward_baseline", self._baseline_env.baseline)
        self._since_save = 0

    def _remove_unreferenced_checkpoints(self) -> None:
        """Delete the checkpoint files of this study's directory that the store's state does not name."""
        state = self.store.load_state(self.name, self.seed, "agent") or {}
        if not state.get("agent"):
            return  # nothing recorded: files there may be a checkpoint being switched to; leave them
        keep = {Path(state[k]) for k in ("agent", "replay") if state.get(k)}
        _remove_stale_checkpoints(self.store.artifact_dir(self.name, self.seed), keep=keep, also=set())

    def save_state(self) -> None:
        """Checkpoint when the run ends (however it ends)."""
        self.checkpoint()

    def _run(self) -> None:
        if self.should_stop():
            return
        env = self.make_env()
        self.model = self.make_agent(env)
        self._since_save = 0
        # A silent in-memory logger: SB3's default one creates an empty /tmp/SB3-<timestamp> folder per run.
        from stable_baselines3.common.logger import Logger

        self.model.set_logger(Logger(folder=None, output_formats=[]))
        self.model.learn(total_timesteps=10**12, callback=_SearchCallback(self), reset_num_timesteps=False)


@SEARCHERS.register("ddpg")
class DDPGSearcher(RLSearcher):
    """AMC's DDPG recipe (warm-up, truncated-normal decaying noise, reward baseline, 300×300, 1e-4/1e-3)."""

    name = "ddpg"
    algo_cls = AMCDDPG


@SEARCHERS.register("td3")
class TD3Searcher(RLSearcher):
    """SB3 TD3 with AMC's warm-up and exploration noise."""

    name = "td3"
    algo_cls = AMCTD3


@SEARCHERS.register("sac")
class SACSearcher(RLSearcher):
    """SB3 SAC (entropy-regularised off-policy actor-critic) with a random warm-up."""

    name = "sac"
    algo_cls = SAC


@SEARCHERS.register("ppo")
class PPOSearcher(RLSearcher):
    """SB3 PPO, updating after every ``rollout_episodes`` episodes."""

    name = "ppo"
    algo_cls = PPO


@SEARCHERS.register("a2c")
class A2CSearcher(RLSearcher):
    """SB3 A2C, updating after every ``rollout_episodes`` episodes."""

    name = "a2c"
    algo_cls = A2C
