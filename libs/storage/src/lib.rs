//! Content-addressed versions of file trees: what volumes, artifacts and a
//! checkpoint's state directory are made of.
//!
//! A version is a set of files, each a relative path, a size and a SHA-256
//! ([`Manifest`]). Its id ([`VersionId`]) is the SHA-256 of that set in path
//! order, so identical content is the same version wherever it comes from.
//! Every path a client names passes [`paths::check`] first: nothing it names
//! can point outside the version's own place.

pub mod archive;
#[cfg(feature = "store")]
pub mod assemble;
pub mod manifest;
#[cfg(feature = "store")]
pub mod objects;
pub mod paths;
#[cfg(feature = "store")]
pub mod signed;
/// A real S3-compatible server (moto) for tests.
#[cfg(feature = "store")]
pub mod testing;

pub use archive::{ArchiveError, ArchiveWriter, Packed, pack_dir, pack_dir_stored, unpack};
#[cfg(feature = "store")]
pub use assemble::{AssembleError, Part, archive_objects};
pub use manifest::{FileEntry, Limits, Manifest, ManifestError, VersionId, VersionPrefix};
#[cfg(feature = "store")]
pub use objects::{Objects, ObjectsError, Stored};
pub use paths::PathError;
#[cfg(feature = "store")]
pub use signed::{Access, Grant, SignatureError, UrlSigner};
