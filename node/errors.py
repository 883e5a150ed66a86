"""One hierarchy of the project's errors, each with a stable code used by JSON-RPC and the CLI.

Foreign exceptions (msgpack, plyvel, coincurve, aiohttp, eth-account) are translated into these at
the adapter that imports the library, so callers only ever catch ``NeuroSeedError`` subclasses.
Codes: JSON-RPC reserves -32768..-32000; application codes are positive and documented in
``docs/rpc.md``.
"""

from __future__ import annotations


class NeuroSeedError(Exception):
    """Base of every error the node raises on purpose."""

    code: int = 1000
    reason: str = "error"

    def __init__(self, message: str = "", *, data: object | None = None) -> None:
        super().__init__(message or self.reason)
        self.message = message or self.reason
        self.data = data


# --- encoding --------------------------------------------------------------------------------


class DecodeError(NeuroSeedError):
    """Bytes that are not the one canonical encoding of the expected record."""

    code = 1001
    reason = "malformed encoding"


class NonCanonicalEncoding(DecodeError):
    code = 1002
    reason = "non-canonical encoding"


class TooLarge(DecodeError):
    code = 1003
    reason = "too large"


class EncodeError(NeuroSeedError, ValueError):
    """A record holds a value its declared type cannot encode (out of range, too long)."""

    code = 1004
    reason = "value cannot be encoded"


# --- crypto ----------------------------------------------------------------------------------


class InvalidSignature(NeuroSeedError):
    code = 1101
    reason = "invalid signature"


class MalleableSignature(InvalidSignature):
    code = 1102
    reason = "malleable signature (high S or recovery id not 0/1)"


# --- transactions ------------------------------------------------------------------------------


class InvalidTransaction(NeuroSeedError):
    code = 1200
    reason = "invalid transaction"


class WrongChain(InvalidTransaction):
    code = 1201
    reason = "wrong chain id"


class NonceTooLow(InvalidTransaction):
    code = 1202
    reason = "nonce too low"


class NonceGap(InvalidTransaction):
    code = 1203
    reason = "nonce gap"


class InsufficientFunds(InvalidTransaction):
    code = 1204
    reason = "insufficient funds for amount + fee"


class FeeTooLow(InvalidTransaction):
    code = 1205
    reason = "fee below cost"


class UnknownKind(InvalidTransaction):
    code = 1206
    reason = "unknown transaction kind"


class InvalidBody(InvalidTransaction):
    code = 1207
    reason = "invalid transaction body"


class TransactionTooLarge(InvalidTransaction):
    code = 1208
    reason = "transaction too large"


class TransactionSignatureError(InvalidTransaction):
    code = 1209
    reason = "bad transaction signature"


class MalleableTransactionSignature(TransactionSignatureError):
    code = 1210
    reason = "malleable transaction signature"


class MalformedTransaction(InvalidTransaction):
    """The signed envelope itself is not a canonical ``SignedTransaction``."""

    code = 1211
    reason = "malformed transaction"


# --- mempool ---------------------------------------------------------------------------------


class MempoolRejected(NeuroSeedError):
    code = 1300
    reason = "rejected by mempool"


class AlreadyKnown(MempoolRejected):
    code = 1301
    reason = "transaction already known"


class MempoolFull(MempoolRejected):
    code = 1302
    reason = "mempool full"


class FutureQueueFull(MempoolRejected):
    code = 1303
    reason = "too many future-nonce transactions for this sender"


class ReplacementUnderpriced(MempoolRejected):
    code = 1304
    reason = "replacement fee too low"


# --- blocks and consensus ----------------------------------------------------------------------


class InvalidBlock(NeuroSeedError):
    code = 1400
    reason = "invalid block"


class InvalidVote(NeuroSeedError):
    code = 1401
    reason = "invalid vote"


class InvalidCommit(InvalidBlock):
    code = 1402
    reason = "invalid commit"


class ConflictingSignature(NeuroSeedError):
    """The sign-state refuses to sign something that conflicts with what was signed before."""

    code = 1403
    reason = "refusing to sign a conflicting message"


# --- validator-set and parameter transactions (DESIGN §5 "Authority") ------------------------


class BondTooSmall(InvalidTransaction):
    code = 1212
    reason = "bond below the minimum validator bond"


class BondUnbonding(InvalidTransaction):
    code = 1213
    reason = "the bond is unbonding"


class NotBonded(InvalidTransaction):
    code = 1214
    reason = "no bond"


class NotAValidator(InvalidTransaction):
    code = 1215
    reason = "sender is not a validator of this height"


class InvalidVoteSubject(InvalidTransaction):
    code = 1216
    reason = "the vote's subject cannot take this action"


class DuplicateValidatorVote(InvalidTransaction):
    code = 1217
    reason = "already voted"


class BelowValidatorFloor(InvalidTransaction):
    code = 1218
    reason = "the validator set would fall below its floor"


class InvalidParams(InvalidTransaction):
    code = 1219
    reason = "invalid parameter proposal"


# --- evidence of equivocation (DESIGN §5 "Evidence") -----------------------------------------


class InvalidEvidence(NeuroSeedError):
    code = 1410
    reason = "invalid evidence"


class NonConflictingEvidence(InvalidEvidence):
    """The two votes are not an equivocation (or not in their one canonical order)."""

    code = 1411
    reason = "the votes of the evidence do not conflict"


class EvidenceSignatureError(InvalidEvidence):
    code = 1412
    reason = "badly signed evidence"


class ExpiredEvidence(InvalidEvidence):
    code = 1413
    reason = "evidence too old"


class DuplicateEvidence(InvalidEvidence):
    code = 1414
    reason = "evidence already processed"


class EvidenceOfNonValidator(InvalidEvidence):
    code = 1415
    reason = "the evidence names no validator of its height"


# --- storage and lookup ------------------------------------------------------------------------


class NotFound(NeuroSeedError):
    code = 1500
    reason = "not found"


class StorageError(NeuroSeedError):
    code = 1600
    reason = "storage error"


class CorruptDatabase(StorageError):
    code = 1601
    reason = "database is corrupt"


class ProofError(NeuroSeedError):
    code = 1700
    reason = "invalid proof"


class HistoryPruned(NotFound):
    code = 1501
    reason = "state at this height has been pruned"


# --- configuration, keys -----------------------------------------------------------------------


class ConfigError(NeuroSeedError):
    code = 1800
    reason = "configuration error"


class KeystoreError(NeuroSeedError):
    code = 1900
    reason = "keystore error"


class NodeUnavailable(NeuroSeedError):
    code = 2000
    reason = "node unavailable"
