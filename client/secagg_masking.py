"""The site's part of secure aggregation: keys, shares, the masked update, the unmasking shares.

A round's secrets live only in the node's in-memory context (never on disk, never sent): a site
that restarts mid-round has lost them and counts as dropped out, which the protocol recovers from.

The coordinator is not trusted to follow the protocol. Every answer is checked against what the
site itself knows: its enrolled identity (its ledger key and the run's roster it signed) and the
study's `[secure_aggregation]` settings (checked against the digest the roster carries), which fix
`pm_common.secagg.primitives.Rules`. So a site

- makes one key set per round, signs its public keys with its ledger key, and shares its keys once
  (a repeated set-up gets the same keys back; a repeated key sharing is refused);
- accepts only neighbours on the roster, each once, whose round keys carry their own signature;
- accepts only the study's threshold, neighbourhood size, clip range, quantisation and weights;
- refuses to send a masked input unless it holds share bundles from at least the threshold of its
  neighbours (SecAgg+'s rule: otherwise its input would be masked by its self mask alone);
- confirms one survivor set per round, and only one it can vouch for (its own input went out, its
  surviving neighbours are ones it masked with), by signature;
- reveals shares once, only for the survivor set it confirmed and that a strict majority of the
  roster confirmed too, the self-mask seed only of survivors that confirmed it themselves, and
  never both kinds of share for one peer.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from flwr.app import ConfigRecord, RecordDict

from client.site import parse_study_text
from pm_common.records.roster import Roster, study_digest
from pm_common.secagg import primitives as sa
from pm_common.study.config import StudyConfigError

STATE_KEY = "pmfl-secagg"
CLOSED_KEY = f"{STATE_KEY}-closed"


@dataclass(frozen=True)
class SiteIdentity:
    """Who this site is in the run: its name, its ledger key (its enrolled identity), and the run's
    roster it signed, which names every peer's ledger key."""

    site: str
    key: Ed25519PrivateKey
    roster: Roster


@dataclass
class SecAggSiteState:
    """One round's secrets, the rules it runs under, and what the site has answered so far."""

    round: int
    run: str
    site: str
    sk_c: bytes  # encrypts the shares this site sends and receives
    mask_seed: bytes  # derives the key of the pairwise masks; its shares are revealed if the site drops out
    seed: bytes  # the self mask; its shares are revealed if the site's input arrives
    key_signature: bytes  # this site's ledger-key signature over its round public keys
    degree: int  # the study's rules (pm_common.secagg.primitives.Rules), verified at set-up
    fraction: float
    clip_range: float
    max_weight: float
    roster_size: int
    shared: bool = False
    neighbours: list[str] = field(default_factory=list)  # site names, this site included
    pk_c: list[bytes] = field(default_factory=list)  # aligned with neighbours
    pk_s: list[bytes] = field(default_factory=list)
    threshold: int = 0
    own_seed_share: bytes = b""
    own_key_share: bytes = b""
    masked: bool = False
    shares_from: list[str] = field(default_factory=list)
    seed_shares: list[bytes] = field(default_factory=list)  # aligned with shares_from
    key_shares: list[bytes] = field(default_factory=list)
    survivors: list[str] = field(default_factory=list)  # the survivor set this site confirmed
    survivors_signature: bytes = b""
    unmasked: bool = False
    revealed_seeds: list[str] = field(default_factory=list)
    revealed_keys: list[str] = field(default_factory=list)

    @property
    def rules(self) -> sa.Rules:
        return sa.Rules(self.degree, self.fraction, self.clip_range, self.max_weight, self.roster_size)

    def to_record(self) -> ConfigRecord:
        return ConfigRecord({k: v for k, v in self.__dict__.items()})

    @classmethod
    def from_record(cls, record: ConfigRecord) -> SecAggSiteState:
        values = dict(record)
        return cls(**{k: (list(v) if isinstance(v, list) else v) for k, v in values.items()})


def _key(round_: int) -> str:
    return f"{STATE_KEY}-r{round_}"


def _closed(state: RecordDict) -> list[int]:
    record = state.config_records.get(CLOSED_KEY)
    return [int(r) for r in record["rounds"]] if record else []


def load(state: RecordDict, round_: int) -> SecAggSiteState:
    """This round's secure-aggregation state, from the node's in-memory context.

    Refuses rather than making new keys: a round whose secrets are gone (over, or the site restarted)
    must count as dropped out, never be answered with fresh secrets.

    Args:
        state: The node's context state.
        round_: The round.

    Returns:
        The round's state.

    Raises:
        SecAggError: The round is over at this site, or it holds no keys for it.
    """
    if round_ in _closed(state):
        raise sa.SecAggError(f"round {round_} is over at this site: it answers nothing more about it")
    record = state.config_records.get(_key(round_))
    if record is None:
        raise sa.SecAggError(f"no secure-aggregation keys for round {round_} at this site (restarted?)")
    return SecAggSiteState.from_record(record)


def save(state: RecordDict, secagg: SecAggSiteState) -> None:
    """Store the round's state back in the node's in-memory context (never on disk).

    Args:
        state: The node's context state.
        secagg: The round's state, as updated by the last answer.
    """
    state[_key(secagg.round)] = secagg.to_record()


def forget(state: RecordDict, round_: int) -> None:
    """Close a round: drop its secrets and answer nothing more about it.

    Called when its unmasking is done, or the coordinator moved on without it.

    Args:
        state: The node's context state.
        round_: The round to close.
    """
    if _key(round_) in state:
        del state[_key(round_)]
    state[CLOSED_KEY] = ConfigRecord({"rounds": sorted({*_closed(state), round_})})


def _forget_before(state: RecordDict, round_: int) -> None:
    for key in list(state.config_records):
        if key.startswith(f"{STATE_KEY}-r") and int(key.removeprefix(f"{STATE_KEY}-r")) < round_:
            forget(state, int(key.removeprefix(f"{STATE_KEY}-r")))


def study_rules(identity: SiteIdentity, study_text: str) -> sa.Rules:
    """The run's rules, from the study text the coordinator sends, once it is the one this site signed (by
    digest) in the run's roster.

    Args:
        identity: This site's enrolled identity.
        study_text: The study text sent with the set-up request.

    Returns:
        The rules the round must follow.

    Raises:
        SecAggError: another study text, or a study without secure aggregation.
    """
    if study_digest(study_text) != identity.roster.study_digest:
        raise sa.SecAggError("the study sent with the set-up is not the one this site signed in the roster")
    try:
        config = parse_study_text(study_text).secure_aggregation
    except StudyConfigError as exc:
        raise sa.SecAggError(f"the study sent with the set-up does not parse: {exc}") from None
    if not config.enabled:
        raise sa.SecAggError("the run's study does not use secure aggregation")
    return sa.Rules.of(config, len(identity.roster.sites))


def setup(state: RecordDict, identity: SiteIdentity, rules: sa.Rules, round_: int) -> SecAggSiteState:
    """This round's keys: made once, and asked again, the same ones.

    Fresh X25519 key pairs and self-mask seed, the public keys signed with the site's ledger key for
    this run, round and name. Returning the same keys to a repeated request keeps a coordinator from
    collecting several key sets of one site for one round.

    Args:
        state: The node's context state.
        identity: This site's enrolled identity.
        rules: The run's rules (`study_rules`).
        round_: The round.

    Returns:
        The round's state, holding its secrets.

    Raises:
        SecAggError: the round is over here, or it was keyed under other rules or another run.
    """
    run, record = identity.roster.run, state.config_records.get(_key(round_))
    if record is not None or round_ in _closed(state):
        existing = load(state, round_)  # refuses a round that is over
        if (existing.run, existing.site, existing.rules) != (run, identity.site, rules):
            raise sa.SecAggError(f"round {round_} was keyed for another run or under other rules")
        return existing
    sk_c, mask_seed = sa.new_private_key(), os.urandom(sa.SEED_BYTES)
    pk_c, pk_s = sa.public_key(sk_c), sa.public_key(sa.mask_private_key(mask_seed))
    secagg = SecAggSiteState(
        round_, run, identity.site, sk_c, mask_seed, os.urandom(sa.SEED_BYTES),
        sa.sign_keys(identity.key, run, round_, identity.site, pk_c, pk_s),
        rules.degree, rules.fraction, rules.clip_range, rules.max_weight, rules.roster_size,
    )
    save(state, secagg)
    return secagg


def public_keys(secagg: SecAggSiteState) -> tuple[bytes, bytes]:
    """The round's two public keys, derived from the secrets the state keeps (public keys are not stored).

    Args:
        secagg: The round's state.

    Returns:
        (pk-c, pk-s): the key for sealing shares and the key for pairwise masks, raw bytes.
    """
    return sa.public_key(secagg.sk_c), sa.public_key(sa.mask_private_key(secagg.mask_seed))


def keys_record(secagg: SecAggSiteState) -> ConfigRecord:
    """The site's signed round public keys, as the coordinator relays them to its neighbours.

    Args:
        secagg: The round's state.

    Returns:
        A record with the site's name, pk-c, pk-s and its ledger-key signature over them.
    """
    pk_c, pk_s = public_keys(secagg)
    return ConfigRecord({"site": secagg.site, "pk-c": pk_c, "pk-s": pk_s, "signature": secagg.key_signature})


def share_keys(
    secagg: SecAggSiteState,
    identity: SiteIdentity,
    neighbours: Sequence[str],
    pk_c: Sequence[bytes],
    pk_s: Sequence[bytes],
    signatures: Sequence[bytes],
    threshold: int,
) -> tuple[list[str], list[bytes]]:
    """Shamir-share the seed and mask key among the neighbours, once; one sealed bundle each.

    Args:
        secagg: The round's state; updated with the neighbours, their keys and the threshold.
        identity: This site's enrolled identity.
        neighbours: Site names, this site included.
        pk_c: Each neighbour's round key for sealing shares, aligned with `neighbours`.
        pk_s: Each neighbour's round key for pairwise masks, aligned with `neighbours`.
        signatures: The signatures the neighbours' sites made over their round keys, aligned.
        threshold: The reconstruction threshold the coordinator asks for.

    Returns:
        The destinations (every neighbour but this site) and their sealed bundles, aligned.

    Raises:
        SecAggError: a second key sharing, a neighbour off the roster or listed twice, keys that
            are not their site's, or a neighbourhood or threshold the study does not allow.
    """
    if secagg.shared:
        raise sa.SecAggError(f"round {secagg.round}: this site already shared its keys (one set per round)")
    names = [str(n) for n in neighbours]
    if not len(names) == len(pk_c) == len(pk_s) == len(signatures):
        raise sa.SecAggError("neighbours, public keys and signatures do not line up")
    if len(set(names)) != len(names):
        twice = sorted({n for n in names if names.count(n) > 1})
        raise sa.SecAggError(f"a neighbour is listed twice: {twice}")
    strangers = sorted(set(names) - set(identity.roster.site_names))
    if strangers:
        raise sa.SecAggError(f"neighbours not on the run's roster: {strangers}")
    if secagg.site not in names:
        raise sa.SecAggError(f"{secagg.site} is not among its own neighbours")
    own = names.index(secagg.site)
    if (bytes(pk_c[own]), bytes(pk_s[own])) != public_keys(secagg):
        raise sa.SecAggError("the coordinator relayed public keys under this site's name that are not its")
    if problem := secagg.rules.neighbourhood_problem(len(names), int(threshold)):
        raise sa.SecAggError(problem)
    run, round_ = secagg.run, secagg.round
    forged = [
        name for name, c, s, sig in zip(names, pk_c, pk_s, signatures, strict=True)
        if not sa.keys_signature_valid(identity.roster, run, round_, name, bytes(c), bytes(s), sig)
    ]
    if forged:
        raise sa.SecAggError(f"round keys relayed for {forged} are not signed by those sites' enrolled keys")
    seed_shares = sa.split_secret(secagg.seed, int(threshold), len(names))
    key_shares = sa.split_secret(secagg.mask_seed, int(threshold), len(names))
    secagg.neighbours, secagg.threshold, secagg.shared = names, int(threshold), True
    secagg.pk_c, secagg.pk_s = [bytes(k) for k in pk_c], [bytes(k) for k in pk_s]
    secagg.own_seed_share, secagg.own_key_share = seed_shares[own], key_shares[own]
    destinations, sealed = [], []
    for pos, peer in enumerate(names):
        if peer == secagg.site:
            continue
        context = sa.share_context(secagg.run, secagg.round, secagg.site, peer)
        key = sa.agree(secagg.sk_c, secagg.pk_c[pos], context)
        destinations.append(peer)
        sealed.append(sa.seal(key, seed_shares[pos] + key_shares[pos], context))
    return destinations, sealed


def masked_input(
    secagg: SecAggSiteState,
    senders: Sequence[str],
    sealed: Sequence[bytes],
    vector: np.ndarray,
    quantiser: sa.Quantiser,
) -> tuple[np.ndarray, int]:
    """Open the shares addressed to this site, then mask its quantised `vector`, once per round.

    Pairwise masks are added only for the neighbours whose shares arrived (those that completed
    key sharing): any of them that drops out later can then be unmasked from its shares.

    Args:
        secagg: The round's state; marked as masked.
        senders: The neighbours whose share bundles were relayed.
        sealed: Their sealed bundles, aligned with `senders`.
        vector: The site's (weighted, flattened) update.
        quantiser: The run's quantiser.

    Returns:
        The masked uint32 vector and the number of clipped coordinates.

    Raises:
        SecAggError: as `open_shares` does, in which case the site sends no input.
    """
    names = open_shares(secagg, senders, sealed)
    quantised, clipped = quantiser.quantise(vector, np.random.default_rng())
    masked = quantised + sa.self_mask(secagg.seed, secagg.round, len(quantised))
    for peer in names:
        pk = secagg.pk_s[secagg.neighbours.index(peer)]
        pair = sa.pairwise_mask(secagg.mask_seed, pk, secagg.round, len(quantised))
        masked = masked + pair if sa.pairwise_sign(secagg.site, peer) > 0 else masked - pair
    secagg.masked = True
    return masked.astype(np.uint32), clipped


def open_shares(secagg: SecAggSiteState, senders: Sequence[str], sealed: Sequence[bytes]) -> list[str]:
    """Open the share bundles relayed to this site (kept in `secagg`); the neighbours they came from.

    SecAgg+'s abort rule: with fewer than the threshold of its neighbours' shares (its own
    included) the site sends nothing, since its input would be masked by too few pairwise masks
    for the threshold to protect it (a coordinator that relays no bundles at all would otherwise
    unmask the input from the self-mask seed shares alone).

    Args:
        secagg: The round's state; receives the opened shares.
        senders: The neighbours the bundles claim to come from.
        sealed: The sealed bundles, aligned with `senders`.

    Returns:
        The senders' names.

    Raises:
        SecAggError: an input was sent already, too few bundles, or bundles that are not its neighbours'.
    """
    if secagg.masked:
        raise sa.SecAggError(f"round {secagg.round}: this site already sent its masked input")
    if not secagg.shared:
        raise sa.SecAggError(f"round {secagg.round}: this site never shared its keys for this round")
    names = [str(s) for s in senders]
    if len(set(names)) != len(names):
        raise sa.SecAggError("a share bundle is relayed twice from the same neighbour")
    strangers = sorted(set(names) - (set(secagg.neighbours) - {secagg.site}))
    if strangers:
        raise sa.SecAggError(f"shares relayed from non-neighbours {strangers}")
    if len(names) + 1 < secagg.threshold:
        raise sa.SecAggError(
            f"share bundles from only {len(names)} of its {len(secagg.neighbours) - 1} neighbours: with its "
            f"own that is fewer than the threshold {secagg.threshold}; this site sends no input this round"
        )
    secagg.shares_from, secagg.seed_shares, secagg.key_shares = [], [], []
    for sender, blob in zip(names, sealed, strict=True):
        pk = secagg.pk_c[secagg.neighbours.index(sender)]
        context = sa.share_context(secagg.run, secagg.round, sender, secagg.site)
        bundle = sa.unseal(sa.agree(secagg.sk_c, pk, context), bytes(blob), context)
        split = len(secagg.own_seed_share)
        secagg.shares_from.append(sender)
        secagg.seed_shares.append(bundle[:split])
        secagg.key_shares.append(bundle[split:])
    return names


def confirm_survivors(secagg: SecAggSiteState, identity: SiteIdentity, survivors: Sequence[str]) -> bytes:
    """Sign the round's survivor set (SecAgg's consistency check), one set per round.

    The site vouches only for a set it can stand behind: its own input went out, and every
    surviving neighbour is one whose shares it received (one it masked with), at least the
    threshold of them. A repeated request for the same set gets the same signature.

    Args:
        secagg: The round's state; records the confirmed set and signature.
        identity: This site's enrolled identity.
        survivors: The survivor set the coordinator asks it to confirm.

    Returns:
        The raw ledger-key signature over the (sorted) survivor set.

    Raises:
        SecAggError: another set than the one confirmed, or one this site cannot vouch for.
    """
    names = sorted(str(s) for s in survivors)
    if secagg.survivors:
        if names != secagg.survivors:
            raise sa.SecAggError(f"round {secagg.round}: this site already confirmed another survivor set")
        return secagg.survivors_signature
    if not secagg.masked:
        raise sa.SecAggError(f"round {secagg.round}: this site sent no input, it confirms no survivors")
    if len(set(names)) != len(names):
        raise sa.SecAggError("a survivor is listed twice")
    strangers = sorted(set(names) - set(identity.roster.site_names))
    if strangers:
        raise sa.SecAggError(f"survivors not on the run's roster: {strangers}")
    if secagg.site not in names:
        raise sa.SecAggError("this site's input is not among the survivors it is asked to confirm")
    if len(names) < secagg.rules.quorum:
        raise sa.SecAggError(f"{len(names)} survivors, fewer than a majority of the roster "
                             f"({secagg.rules.quorum})")
    local = [n for n in secagg.neighbours if n in names]
    unmasked_with = sorted(set(local) - set(secagg.shares_from) - {secagg.site})
    if unmasked_with:
        raise sa.SecAggError(f"survivors {unmasked_with} sent this site no shares: it did not mask with them")
    if len(local) < secagg.threshold:
        raise sa.SecAggError(
            f"only {len(local)} of this site's neighbours survive, fewer than the threshold "
            f"{secagg.threshold}: the sum could reveal a single site's update"
        )
    secagg.survivors = names
    secagg.survivors_signature = sa.sign_survivors(identity.key, secagg.run, secagg.round, names)
    return secagg.survivors_signature


def unmasking_shares(
    secagg: SecAggSiteState,
    identity: SiteIdentity,
    survivors: Sequence[str],
    signers: Sequence[str],
    signatures: Sequence[bytes],
) -> tuple[list[str], list[bytes], list[str], list[bytes]]:
    """Seed shares of the survivors and key shares of the neighbours that dropped, once per round.

    Only for the survivor set this site confirmed, once a strict majority of the roster confirmed
    that same set (their signatures come with the request): two different survivor sets can then
    never both be unmasked, so no peer is treated as a survivor by some sites and as dropped by
    others. A survivor's seed share goes out only if that survivor confirmed the set itself.
    Never both kinds of share for one peer, across every request of the round.

    Args:
        secagg: The round's state; marked as unmasked, with what it revealed.
        identity: This site's enrolled identity.
        survivors: The survivor set the coordinator asks shares for.
        signers: The sites whose confirmations come with the request.
        signatures: Their signatures over the survivor set, aligned with `signers`.

    Returns:
        (seed sites, their self-mask seed shares, key sites, their mask-key seed shares).

    Raises:
        SecAggError: a second request, another survivor set, too few confirmations.
    """
    if secagg.unmasked:
        raise sa.SecAggError(f"round {secagg.round}: unmasking shares were already given")
    names, run, round_ = sorted(str(s) for s in survivors), secagg.run, secagg.round
    if not secagg.survivors or names != secagg.survivors:
        raise sa.SecAggError(f"round {secagg.round}: not the survivor set this site confirmed")
    confirmed = {
        str(site) for site, sig in zip(signers, signatures, strict=True)
        if str(site) in names
        and sa.survivors_signature_valid(identity.roster, run, round_, names, str(site), sig)
    }
    confirmed.add(secagg.site)  # it signed this very set (checked above)
    if len(confirmed) < secagg.rules.quorum:
        raise sa.SecAggError(
            f"{len(confirmed)} sites confirmed the survivors, fewer than a majority of the roster "
            f"({secagg.rules.quorum}): no shares are revealed"
        )
    held = dict(zip(secagg.shares_from, zip(secagg.seed_shares, secagg.key_shares, strict=True), strict=True))
    held[secagg.site] = (secagg.own_seed_share, secagg.own_key_share)
    unconfirmed = sorted(n for n in names if n in held and n not in confirmed)
    if unconfirmed:
        raise sa.SecAggError(f"survivors {unconfirmed} did not confirm the survivor set: seeds stay hidden")
    seed_sites = [n for n in sorted(held) if n in names]
    key_sites = [n for n in sorted(held) if n not in names]
    seeds, keys = set(seed_sites) | set(secagg.revealed_seeds), set(key_sites) | set(secagg.revealed_keys)
    both = sorted(seeds & keys)
    if both:  # by construction never; kept as the rule's last line of defence
        raise sa.SecAggError(f"would reveal both kinds of share of {both}")
    secagg.unmasked = True
    secagg.revealed_seeds = sorted({*secagg.revealed_seeds, *seed_sites})
    secagg.revealed_keys = sorted({*secagg.revealed_keys, *key_sites})
    return seed_sites, [held[n][0] for n in seed_sites], key_sites, [held[n][1] for n in key_sites]


def handle(request: ConfigRecord, state: RecordDict, identity: SiteIdentity) -> ConfigRecord:
    """Answer a key stage: `setup`, `share-keys`, `survivors` or `unmask`.

    The last two may carry the next round's key sharing: the round after it is then ready without
    extra exchanges.

    Args:
        request: The coordinator's request (its `stage`, `round`, run and the stage's fields).
        state: The node's context state.
        identity: This site's enrolled identity.

    Returns:
        The reply record for the stage (plus the next round's shares when asked).

    Raises:
        SecAggError: a request for another run, an unknown stage, or any refusal of the stage itself.
    """
    _check_run(request, identity)
    stage, round_ = str(request["stage"]), int(request["round"])
    if stage == "setup":
        return keys_record(setup(state, identity, study_rules(identity, str(request["study-toml"])), round_))
    if stage == "share-keys":
        return _share(request, state, identity, round_)
    if stage == "survivors":
        secagg = load(state, round_)
        signature = confirm_survivors(secagg, identity, request["survivors"])
        save(state, secagg)
        reply = ConfigRecord({"signature": signature})
    elif stage == "unmask":
        secagg = load(state, round_)
        seed_sites, seed_shares, key_sites, key_shares = unmasking_shares(
            secagg, identity, request["survivors"], request["signers"], request["survivor-signatures"]
        )
        forget(state, round_)
        reply = ConfigRecord({
            "seed-sites": seed_sites, "seed-shares": seed_shares,
            "key-sites": key_sites, "key-shares": key_shares,
        })
    else:
        raise sa.SecAggError(f"unknown secure-aggregation stage {stage[:40]!r}")
    if "next-round" in request:
        reply.update(_share(request, state, identity, int(request["next-round"])))
    return reply


def _check_run(request: ConfigRecord, identity: SiteIdentity) -> None:
    run, study = str(request.get("run", "")), str(request.get("study", ""))
    if run != identity.roster.run or study != identity.roster.study:
        raise sa.SecAggError(f"the request names run {run[:12]!r} of study {study!r}: not this site's run")


def _share(request: ConfigRecord, state: RecordDict, identity: SiteIdentity, round_: int) -> ConfigRecord:
    secagg = load(state, round_)
    destinations, sealed = share_keys(
        secagg, identity, request["neighbours"], request["pk-c"], request["pk-s"], request["key-signatures"],
        int(request["threshold"]),
    )
    save(state, secagg)
    return ConfigRecord({"destinations": destinations, "sealed": sealed})


def relay_rules(request: ConfigRecord, state: RecordDict, identity: SiteIdentity) -> sa.Rules:
    """The run's rules for a training relay, once it matches what this site keyed the round under.

    Its run, round, clip range, quantisation levels and max weight must be the ones this site keyed
    the round under (see `Rules.relay_problem`) and its share bundles must be enough and open
    (`open_shares`). A site checks this before it trains: a relay it refuses costs it no privacy
    budget.

    Args:
        request: The training relay.
        state: The node's context state.
        identity: This site's enrolled identity.

    Returns:
        The round's rules.

    Raises:
        SecAggError: another run, a round without keys, or parameters the study does not set.
    """
    _check_run(request, identity)
    secagg = load(state, int(request["round"]))
    rules = secagg.rules
    if problem := rules.relay_problem(request["clip-range"], request["levels"], request["max-weight"]):
        raise sa.SecAggError(f"the training relay's {problem}")
    open_shares(secagg, request["senders"], request["sealed"])  # checked before training: not saved
    return rules


def mask_update(
    request: ConfigRecord, state: RecordDict, vector: np.ndarray, identity: SiteIdentity
) -> tuple[np.ndarray, int, ConfigRecord]:
    """The training stage: this round's masked `vector` and what goes back with it.

    Earlier rounds' secrets are dropped here, since the coordinator has moved on from them.

    Args:
        request: The training relay.
        state: The node's context state.
        vector: The site's update to mask.
        identity: This site's enrolled identity.

    Returns:
        The masked vector, its number of clipped coordinates, and a record with the next round's
        signed public keys when the coordinator asks for them (empty otherwise).
    """
    rules = relay_rules(request, state, identity)
    secagg = load(state, int(request["round"]))
    masked, clipped = masked_input(secagg, request["senders"], request["sealed"], vector, rules.quantiser)
    save(state, secagg)
    _forget_before(state, secagg.round)  # the coordinator has moved on from every earlier round
    reply = ConfigRecord()
    if "next-round" in request:
        reply = keys_record(setup(state, identity, rules, int(request["next-round"])))
    return masked, clipped, reply
