//! The object-store blob backend: content in a bucket (`s3://BUCKET[/PREFIX]`, also `gs://` and
//! `az://`), under `PREFIX/sha256/<2 hex>/<62 hex>`, and a bounded local cache of it.
//!
//! Everything async stays in this file: one small tokio runtime drives `object_store`, and every
//! function here blocks its caller (a FUSE worker thread, a command) until the bucket answered.
//! Large objects move in parts of [`PART`] bytes, several at once, each part a task of its own;
//! the caller's thread does the reading, hashing and writing of local files in between.
//!
//! Faults: `object_store` retries 5xx, SlowDown, throttling and refused connections with
//! backoff; a part whose body breaks off is asked for again. Both stop after the patience
//! ([`PATIENCE`], about 30 s), and then the caller gets an error (`close()` and `read()`
//! answer `EIO`). Nothing is published by a failed call: an object appears whole or not at all.
//!
//! The cache ([`BlobCache`]) keeps whole, verified objects as files, so that sealed files are read
//! (and passed through to the kernel) at local disk speed. It stays within its size by dropping
//! the least recently opened content first, never content that is open.

use std::collections::{HashMap, VecDeque};
use std::fs::{self, File};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use object_store::path::Path as Key;
use object_store::{
    BackoffConfig, ClientConfigKey, GetOptions, GetRange, ObjectStore, ObjectStoreExt, PutMode,
    PutOptions, PutPayload, RetryConfig,
};
use sha2::{Digest, Sha256};

use super::Hash;

/// The size of one part of an upload or of a ranged download.
pub const PART: u64 = 8 << 20;
/// Content up to this size is uploaded in one PUT (conditional: it never replaces an object);
/// a file written sequentially past it is uploaded while it is written.
pub const ONE_PUT_MAX: u64 = 2 * PART;
/// Parts in flight at once, per upload, and by default per download (`ARTIFACTFS_S3_RANGES`).
const PARALLEL: usize = 8;
/// The most parts one multipart upload may have (S3's limit, also GCS's XML API's).
const MAX_PARTS: u64 = 10_000;

/// The part size of a multipart upload of `len` bytes: [`PART`], or more for content over
/// [`MAX_PARTS`] × [`PART`] (78 GiB), in whole MiB, so that the parts never number more
/// than S3 takes (up to its 5 TiB object limit).
fn part_size(len: u64) -> u64 {
    PART.max(len.div_ceil(MAX_PARTS).next_multiple_of(1 << 20))
}

/// Parts of `part` bytes in flight at once in one upload: [`PARALLEL`] of [`PART`], fewer of
/// larger ones (the bytes in flight stay within `PARALLEL` × `PART`, at least one part).
fn parts_in_flight(part: u64) -> usize {
    ((PARALLEL as u64 * PART) / part).clamp(1, PARALLEL as u64) as usize
}
/// How long a call keeps retrying a bucket that is down or answers 5xx.
pub const PATIENCE: Duration = Duration::from_secs(30);
/// The longest a commit waits for the bucket with the index's write lock held.
const QUICK: Duration = Duration::from_secs(2);
/// The default bound of the local cache (`--cache-size`).
pub const DEFAULT_CACHE_SIZE: u64 = 10 << 30;
/// `gc` leaves objects younger than this alone: an upload in flight has not committed its row
/// yet (the commit's own check under the index's write lock is what keeps it correct; this
/// spares uploading it twice).
pub const UPLOAD_GRACE: Duration = Duration::from_secs(3600);

/// The patience, shortened by tests (`ARTIFACTFS_TEST_S3_PATIENCE_MS`).
fn patience() -> Duration {
    std::env::var("ARTIFACTFS_TEST_S3_PATIENCE_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .map_or(PATIENCE, Duration::from_millis)
}

/// Objects last modified before this time (ns) are past the upload grace ([`UPLOAD_GRACE`],
/// shortened by tests: `ARTIFACTFS_TEST_UPLOAD_GRACE_MS`).
pub fn grace_cutoff_ns() -> i64 {
    let grace = std::env::var("ARTIFACTFS_TEST_UPLOAD_GRACE_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .map_or(UPLOAD_GRACE, Duration::from_millis);
    super::now_ns().saturating_sub(grace.as_nanos().min(i64::MAX as u128) as i64)
}

/// Whether `--blobs` names a bucket rather than a directory.
pub fn is_bucket_url(url: &str) -> bool {
    ["s3://", "s3a://", "gs://", "az://", "azure://", "abfs://"]
        .iter()
        .any(|s| url.starts_with(s))
}

/// What the bucket knows of one object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ObjectInfo {
    pub size: u64,
    /// Last modified, ns since the epoch.
    pub modified_ns: i64,
}

/// A bucket holding content by its hash.
pub struct Remote {
    rt: tokio::runtime::Runtime,
    store: Arc<dyn ObjectStore>,
    /// `PREFIX/` or empty.
    prefix: String,
    /// The URL as given (it holds no credentials: those come from the environment).
    url: String,
    patience: Duration,
    /// Ranged GETs one download keeps in flight; 1: one GET, streamed.
    ranges: usize,
    /// The credentials this process was given, never to be written out: an error's text may
    /// quote them (a server's `SignatureDoesNotMatch` body holds the access key and the signed
    /// request, session token included).
    secrets: Vec<String>,
}

/// `text` with each of `secrets` cut out.
fn redact(secrets: &[String], text: String) -> String {
    secrets
        .iter()
        .fold(text, |t, secret| t.replace(secret.as_str(), "<credential>"))
}

/// The variables whose values are credentials (or, with them, name one).
const SECRET_VARS: &[&str] = &[
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_TOKEN",
    "GOOGLE_SERVICE_ACCOUNT_KEY",
    "GOOGLE_APPLICATION_CREDENTIALS_JSON",
    "AZURE_STORAGE_ACCOUNT_KEY",
    "AZURE_STORAGE_ACCESS_KEY",
    "AZURE_STORAGE_SAS_TOKEN",
    "AZURE_STORAGE_TOKEN",
    "AZURE_CLIENT_SECRET",
];

impl std::fmt::Debug for Remote {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Remote({})", self.url)
    }
}

impl Remote {
    /// Connects to the bucket of `url`, configured from the standard environment variables
    /// (`AWS_ENDPOINT_URL`, `AWS_REGION`, `AWS_ACCESS_KEY_ID`, …, `AWS_ALLOW_HTTP`; the GCS and
    /// Azure equivalents). Nothing is sent yet.
    pub fn open(url: &str) -> io::Result<Remote> {
        Self::open_with(url, &[])
    }

    /// [`Remote::open`] with `vars` (`AWS_…` names and values) taken before the process's
    /// environment: for tests, which must not change their own environment.
    pub fn open_with(url: &str, vars: &[(String, String)]) -> io::Result<Remote> {
        let var = |name: &str| {
            vars.iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.clone())
                .or_else(|| std::env::var(name).ok())
        };
        let bad = |why: String| io::Error::new(io::ErrorKind::InvalidInput, why);
        let secrets: Vec<String> = SECRET_VARS
            .iter()
            .filter_map(|name| var(name))
            .filter(|v| v.len() >= 4)
            .collect();
        let (scheme, rest) = url
            .split_once("://")
            .ok_or_else(|| bad(format!("--blobs {url}: expected s3://BUCKET[/PREFIX]")))?;
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.contains('@') {
            // (Not echoed: what is before the @ may be a secret.)
            return Err(bad(format!(
                "--blobs {scheme}://…: credentials do not belong in the URL; they come from \
                 the environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, …)"
            )));
        }
        let prefix = prefix.trim_matches('/');
        if bucket.is_empty() || prefix.split('/').any(|p| p == "." || p == "..") {
            return Err(bad(format!(
                "--blobs {url}: expected {scheme}://BUCKET[/PREFIX]"
            )));
        }
        // rustls needs one crypto provider for the process (ring: no C toolchain needed).
        let _ = rustls::crypto::ring::default_provider().install_default();
        let patience = patience();
        let retry = RetryConfig {
            backoff: BackoffConfig {
                init_backoff: Duration::from_millis(100),
                max_backoff: Duration::from_secs(2),
                base: 2.0,
            },
            max_retries: usize::MAX,
            retry_timeout: patience,
        };
        // (Set key by key: replacing the client options would drop those read from the
        // environment, AWS_ALLOW_HTTP among them.)
        let timeouts = [
            (ClientConfigKey::ConnectTimeout, "5s"),
            (ClientConfigKey::Timeout, "120s"),
        ];
        let base = format!("{scheme}://{bucket}");
        let fail = |e: object_store::Error| bad(redact(&secrets, format!("--blobs {url}: {e}")));
        let store: Arc<dyn ObjectStore> = match scheme {
            "s3" | "s3a" => {
                let mut b = object_store::aws::AmazonS3Builder::from_env();
                for (k, v) in vars {
                    if let Ok(key) = k.to_ascii_lowercase().parse() {
                        b = b.with_config(key, v);
                    }
                }
                for (k, v) in timeouts {
                    b = b.with_config(object_store::aws::AmazonS3ConfigKey::Client(k), v);
                }
                // (A finished streamed upload is copied to its content key with a plain
                // CopyObject after a HEAD, see `stream_finish`: the conditional copy took twice
                // as long on moto. The copy holds the same bytes as any object already there.)
                let mut b = b.with_url(&base).with_retry(retry);
                // AWS_ALLOW_HTTP is read by from_env(); an http:// endpoint without it would
                // fail every request with an obscure "builder error".
                if var("AWS_ENDPOINT_URL")
                    .or_else(|| var("AWS_ENDPOINT"))
                    .is_some_and(|e| e.starts_with("http://"))
                    && var("AWS_ALLOW_HTTP").is_none()
                {
                    return Err(bad(format!(
                        "--blobs {url}: the endpoint is http://: set AWS_ALLOW_HTTP=true to allow it"
                    )));
                }
                if var("AWS_REGION").is_none() && var("AWS_DEFAULT_REGION").is_none() {
                    b = b.with_region("us-east-1");
                }
                Arc::new(b.build().map_err(fail)?)
            }
            "gs" => {
                let mut b = object_store::gcp::GoogleCloudStorageBuilder::from_env();
                for (k, v) in timeouts {
                    b = b.with_config(object_store::gcp::GoogleConfigKey::Client(k), v);
                }
                Arc::new(b.with_url(&base).with_retry(retry).build().map_err(fail)?)
            }
            "az" | "azure" | "abfs" => {
                let mut b = object_store::azure::MicrosoftAzureBuilder::from_env();
                for (k, v) in timeouts {
                    b = b.with_config(object_store::azure::AzureConfigKey::Client(k), v);
                }
                Arc::new(b.with_url(&base).with_retry(retry).build().map_err(fail)?)
            }
            other => {
                return Err(bad(format!(
                    "--blobs {url}: unknown scheme {other}:// (s3://, gs://, az:// or file://)"
                )));
            }
        };
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("artifactfs-s3")
            .enable_all()
            .build()?;
        Ok(Remote {
            rt,
            store,
            prefix: if prefix.is_empty() {
                String::new()
            } else {
                format!("{prefix}/")
            },
            url: url.to_owned(),
            patience,
            // Servers that read a whole object for every range (moto) are faster with one GET.
            ranges: var("ARTIFACTFS_S3_RANGES")
                .and_then(|v| v.parse().ok())
                .filter(|n| *n >= 1)
                .unwrap_or(PARALLEL),
            secrets,
        })
    }

    /// `text` with every credential this process was given cut out.
    fn redact(&self, text: String) -> String {
        redact(&self.secrets, text)
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    /// Runs one request (retries included) to its end, or until the patience is over: an
    /// endpoint that accepts connections and never answers is given up on too.
    fn block<T>(
        &self,
        fut: impl std::future::Future<Output = object_store::Result<T>>,
    ) -> object_store::Result<T> {
        self.rt.block_on(in_time(self.patience, fut))
    }

    fn key(&self, hash: &Hash) -> Key {
        let hex = hash.to_hex();
        Key::from(format!("{}sha256/{}/{}", self.prefix, &hex[..2], &hex[2..]))
    }

    /// An error of the bucket as an `io::Error` (`NotFound` stays `NotFound`), logged once.
    fn error(&self, what: &str, hash: Option<&Hash>, e: object_store::Error) -> io::Error {
        let kind = match &e {
            object_store::Error::NotFound { .. } => io::ErrorKind::NotFound,
            object_store::Error::AlreadyExists { .. } => io::ErrorKind::AlreadyExists,
            _ => io::ErrorKind::Other,
        };
        let on = hash.map_or(String::new(), |h| format!(" of {h}"));
        let e = self.redact(e.to_string());
        if kind != io::ErrorKind::NotFound {
            log::error!("{}: {what}{on} failed: {e}", self.url);
        }
        io::Error::new(kind, format!("{}: {what}{on}: {e}", self.url))
    }

    /// Size and age of the object holding `hash`, `None` if the bucket has none.
    pub fn head(&self, hash: &Hash) -> io::Result<Option<ObjectInfo>> {
        match self.block(self.store.head(&self.key(hash))) {
            Ok(m) => Ok(Some(ObjectInfo {
                size: m.size,
                modified_ns: m.last_modified.timestamp_nanos_opt().unwrap_or(0),
            })),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(self.error("HEAD", Some(hash), e)),
        }
    }

    /// Whether the bucket has the object of `hash` (of `len` bytes, when given), asked with the
    /// index's write lock held (a commit's last check against garbage collection): bounded to
    /// [`QUICK`], so that a bucket that is down holds up no other machine's commits for long.
    /// `false` when no answer came, or the object has another size (damaged: the commit then
    /// stores it again, see [`Remote::upload_file`]).
    pub fn has_quickly(&self, hash: &Hash, len: Option<u64>) -> bool {
        let key = self.key(hash);
        match self.rt.block_on(in_time(QUICK, self.store.head(&key))) {
            Ok(meta) => len.is_none_or(|len| meta.size == len),
            Err(object_store::Error::NotFound { .. }) => false,
            Err(e) => {
                let e = self.redact(e.to_string());
                log::warn!("{}: HEAD of {hash} under the index lock: {e}", self.url);
                false
            }
        }
    }

    /// Whether `len` bytes of content `hash` must be uploaded: `replace` (the object there is
    /// known damaged), no object, or one of another size (damaged: a truncated upload of some
    /// other client, a bucket's fault), which these bytes then replace. One that has the size
    /// is taken for the content (`fsck --verify` re-hashes objects).
    fn needs_upload(&self, hash: &Hash, len: u64, replace: &mut bool) -> io::Result<bool> {
        if *replace {
            return Ok(true);
        }
        match self.head(hash)? {
            None => Ok(true),
            Some(o) if o.size == len => Ok(false),
            Some(o) => {
                log::warn!(
                    "{}: object {hash} has {} bytes, not {len}: damaged; stored again",
                    self.url,
                    o.size
                );
                *replace = true;
                Ok(true)
            }
        }
    }

    /// Uploads the first `len` bytes of `file` as the object of `hash`, unless the bucket has it
    /// already (then `false`). `replace`: the object there is damaged; these bytes take its
    /// place (the only way an object is ever written twice; also when the object there has
    /// another size, see [`Remote::needs_upload`]).
    pub fn upload_file(
        &self,
        file: &File,
        len: u64,
        hash: &Hash,
        mut replace: bool,
    ) -> io::Result<bool> {
        if !self.needs_upload(hash, len, &mut replace)? {
            return Ok(false);
        }
        if len <= ONE_PUT_MAX {
            let mut buf = vec![0u8; len as usize];
            file.read_exact_at(&mut buf, 0)?;
            return self.put_one(Bytes::from(buf), hash, replace);
        }
        self.put_parts(file, len, hash)
    }

    /// [`Remote::upload_file`] of bytes in memory.
    pub fn upload_bytes(&self, bytes: &[u8], hash: &Hash, mut replace: bool) -> io::Result<bool> {
        if !self.needs_upload(hash, bytes.len() as u64, &mut replace)? {
            return Ok(false);
        }
        self.put_one(Bytes::copy_from_slice(bytes), hash, replace)
    }

    /// One PUT; a conditional one (`If-None-Match: *`) unless `replace`.
    fn put_one(&self, bytes: Bytes, hash: &Hash, replace: bool) -> io::Result<bool> {
        let opts = PutOptions {
            mode: if replace {
                PutMode::Overwrite
            } else {
                PutMode::Create
            },
            ..Default::default()
        };
        let key = self.key(hash);
        let put = self
            .store
            .put_opts(&key, PutPayload::from_bytes(bytes), opts);
        match self.block(put) {
            Ok(_) => Ok(true),
            // Stored meanwhile by another writer of the same content.
            Err(object_store::Error::AlreadyExists { .. })
            | Err(object_store::Error::Precondition { .. }) => Ok(false),
            Err(e) => Err(self.error("PUT", Some(hash), e)),
        }
    }

    /// A multipart upload: this thread reads the parts, up to [`PARALLEL`] of them travel at
    /// once. A multipart upload cannot be made conditional everywhere: two machines storing the
    /// same new content at the same moment may both write it (the same bytes under the same key).
    fn put_parts(&self, file: &File, len: u64, hash: &Hash) -> io::Result<bool> {
        let key = self.key(hash);
        let mut upload = self
            .block(self.store.put_multipart(&key))
            .map_err(|e| self.error("multipart upload", Some(hash), e))?;
        let (size, parallel) = (part_size(len), parts_in_flight(part_size(len)));
        let mut flying = VecDeque::new();
        let result = (|| {
            let mut at = 0;
            while at < len {
                let n = size.min(len - at);
                let mut buf = vec![0u8; n as usize];
                file.read_exact_at(&mut buf, at)?;
                at += n;
                let part = upload.put_part(PutPayload::from(buf));
                flying.push_back(self.rt.spawn(in_time(self.patience, part)));
                if flying.len() >= parallel {
                    self.join(flying.pop_front().expect("one in flight"), Some(hash))?;
                }
            }
            while let Some(part) = flying.pop_front() {
                self.join(part, Some(hash))?;
            }
            self.block(upload.complete())
                .map_err(|e| self.error("completing the upload", Some(hash), e))
        })();
        match result {
            Ok(_) => Ok(true),
            Err(e) => {
                // The parts still travelling are cancelled first, so none lands after the abort.
                for part in flying {
                    part.abort();
                }
                let _ = self.block(upload.abort());
                Err(e)
            }
        }
    }

    fn join<T>(
        &self,
        task: tokio::task::JoinHandle<object_store::Result<T>>,
        hash: Option<&Hash>,
    ) -> io::Result<T> {
        match self.rt.block_on(task) {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(self.error("part", hash, e)),
            Err(e) => Err(io::Error::other(format!(
                "{}: a part's task: {e}",
                self.url
            ))),
        }
    }

    /// Begins the upload of a file still being written (its hash not known yet): a multipart
    /// upload to a temporary key, `PREFIX/staging/<random>`, fed whole parts by
    /// [`Remote::stream_feed`] while the file grows and finished by [`Remote::stream_finish`].
    pub fn stream_begin(&self) -> io::Result<StreamUpload> {
        let mut id = [0u8; 12];
        File::open("/dev/urandom").and_then(|mut f| io::Read::read_exact(&mut f, &mut id))?;
        let id: String = id.iter().map(|b| format!("{b:02x}")).collect();
        let key = Key::from(format!("{}staging/{id}", self.prefix));
        let upload = self
            .block(self.store.put_multipart(&key))
            .map_err(|e| self.error("starting an upload", None, e))?;
        Ok(StreamUpload {
            upload: Some(upload),
            rt: self.rt.handle().clone(),
            key,
            sent: 0,
            flying: VecDeque::new(),
            broken: false,
        })
    }

    /// Sends the whole parts of `file` up to `end` that are not sent yet. Waits (backpressure)
    /// while [`PARALLEL`] parts are in flight. A failure only marks the upload broken: the
    /// commit then uploads the file as usual.
    pub fn stream_feed(&self, up: &mut StreamUpload, file: &File, end: u64) {
        // Parts of [`PART`] go up to `MAX_PARTS - 1` of them (the tail is one more part): a
        // file that grows past that is uploaded at its commit, in larger parts.
        if !up.broken && end > (MAX_PARTS - 1) * PART {
            log::info!(
                "{}: a file over {} GiB is uploaded at its commit, not while it is written",
                self.url,
                ((MAX_PARTS - 1) * PART) >> 30
            );
            up.broken = true;
        }
        while !up.broken && end >= up.sent + PART {
            let mut buf = vec![0u8; PART as usize];
            if file.read_exact_at(&mut buf, up.sent).is_err() {
                up.broken = true;
                break;
            }
            up.sent += PART;
            let part = up.upload().put_part(PutPayload::from(buf));
            up.flying
                .push_back(self.rt.spawn(in_time(self.patience, part)));
            while up.flying.len() >= PARALLEL {
                let oldest = up.flying.pop_front().expect("parts in flight");
                // (The hash is not known yet.)
                if self.join(oldest, None).is_err() {
                    up.broken = true;
                }
            }
        }
    }

    /// Finishes a streamed upload of `file`, `len` bytes hashing to `hash`: the rest is sent,
    /// the upload completed, and the temporary object copied to the content key (unless the
    /// bucket has that content already) and deleted. Falls back to [`Remote::upload_file`]
    /// when the stream broke or the copy cannot be made. Returns whether bytes were stored.
    pub fn stream_finish(
        &self,
        mut up: StreamUpload,
        file: &File,
        len: u64,
        hash: &Hash,
        mut replace: bool,
    ) -> io::Result<bool> {
        if !up.broken && !self.needs_upload(hash, len, &mut replace)? {
            self.stream_abort(up);
            return Ok(false);
        }
        let finished = (|| {
            if up.broken || len < up.sent || len.div_ceil(PART) > MAX_PARTS {
                return Err(io::Error::other("the streamed upload broke off"));
            }
            let mut at = up.sent;
            while at < len {
                let n = PART.min(len - at);
                let mut buf = vec![0u8; n as usize];
                file.read_exact_at(&mut buf, at)?;
                at += n;
                let part = up.upload().put_part(PutPayload::from(buf));
                up.flying
                    .push_back(self.rt.spawn(in_time(self.patience, part)));
            }
            let t = Instant::now();
            for part in std::mem::take(&mut up.flying) {
                self.join(part, Some(hash))?;
            }
            let parts_done = t.elapsed();
            let mut upload = up.upload.take().expect("not finished yet");
            if let Err(e) = self.block(upload.complete()) {
                // Aborted with the stream below: an upload never completed would stay in the
                // bucket, unseen and billed, until aborted.
                up.upload = Some(upload);
                return Err(self.error("completing the upload", Some(hash), e));
            }
            let completed = t.elapsed();
            let copied = self.block(self.store.copy(&up.key, &self.key(hash)));
            let copied_at = t.elapsed();
            let _ = self.block(self.store.delete(&up.key));
            log::debug!(
                "streamed upload of {hash}: last parts {parts_done:?}, complete at {completed:?}, \
                 copied at {copied_at:?}, temporary key deleted at {:?}",
                t.elapsed()
            );
            match copied {
                Ok(()) => Ok(true),
                Err(e) => Err(self.error("copying the upload to its key", Some(hash), e)),
            }
        })();
        match finished {
            Ok(stored) => Ok(stored),
            Err(e) => {
                log::info!(
                    "{}: streamed upload of {hash} not used ({e}); uploading it again",
                    self.url
                );
                self.stream_abort(up);
                self.upload_file(file, len, hash, replace)
            }
        }
    }

    /// Gives up a streamed upload (the file was not written sequentially, or was dropped).
    pub fn stream_abort(&self, mut up: StreamUpload) {
        for part in std::mem::take(&mut up.flying) {
            part.abort();
        }
        if let Some(mut upload) = up.upload.take() {
            let _ = self.block(upload.abort());
        }
    }

    /// Deletes temporary objects of streamed uploads older than `older_than_ns` (left by a
    /// daemon killed between completing and copying one). Returns how many.
    pub fn clean_staging(&self, older_than_ns: i64) -> io::Result<usize> {
        let dir = Key::from(format!("{}staging", self.prefix));
        let listed = self.list_all(&dir);
        let mut n = 0;
        for m in listed.into_iter().flatten() {
            if m.last_modified.timestamp_nanos_opt().unwrap_or(0) < older_than_ns {
                let _ = self.block(self.store.delete(&m.location));
                n += 1;
            }
        }
        Ok(n)
    }

    /// Reads the object of `hash` whole, in ranges of [`PART`] bytes, [`PARALLEL`] at once,
    /// handing each range to `sink` in order (offset, bytes). Returns the size of what was read:
    /// the caller hashes what it is handed and decides what a mismatch means. `None` when the
    /// bucket has no such object.
    pub fn fetch(
        &self,
        hash: &Hash,
        sink: &mut dyn FnMut(u64, &[u8]) -> io::Result<()>,
    ) -> io::Result<Option<u64>> {
        if self.ranges == 1 {
            return self.fetch_streamed(hash, sink);
        }
        let key = self.key(hash);
        // The first range also tells the object's size.
        let first = self.block(range(
            self.store.clone(),
            key.clone(),
            0,
            PART,
            self.patience,
        ));
        let (first, size) = match first {
            Ok(v) => v,
            Err(object_store::Error::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(self.error("GET", Some(hash), e)),
        };
        sink(0, &first)?;
        let mut flying = VecDeque::new();
        let mut next = first.len() as u64;
        let mut done = next;
        while done < size {
            while next < size && flying.len() < self.ranges {
                let end = (next + PART).min(size);
                let task = in_time(
                    self.patience,
                    range(self.store.clone(), key.clone(), next, end, self.patience),
                );
                flying.push_back((next, self.rt.spawn(task)));
                next = end;
            }
            let (at, task) = flying.pop_front().expect("ranges in flight");
            let (bytes, _) = match self.rt.block_on(task) {
                Ok(Ok(v)) => v,
                Ok(Err(e)) => return Err(self.error("GET", Some(hash), e)),
                Err(e) => {
                    return Err(io::Error::other(format!(
                        "{}: a range's task: {e}",
                        self.url
                    )));
                }
            };
            if bytes.is_empty() {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("{}: object {hash} ended at {at} of {size} bytes", self.url),
                ));
            }
            sink(at, &bytes)?;
            done = at + bytes.len() as u64;
        }
        Ok(Some(size))
    }

    /// [`Remote::fetch`] with one GET whose body is handed on as it arrives; a body that breaks
    /// off goes on with a GET of the rest, until the patience is over.
    fn fetch_streamed(
        &self,
        hash: &Hash,
        sink: &mut dyn FnMut(u64, &[u8]) -> io::Result<()>,
    ) -> io::Result<Option<u64>> {
        let key = self.key(hash);
        let mut at = 0u64;
        let mut size = None;
        let mut since = Instant::now();
        loop {
            let opts = GetOptions {
                range: (at > 0).then_some(GetRange::Offset(at)),
                ..Default::default()
            };
            let mut body = match self.block(self.store.get_opts(&key, opts)) {
                Ok(r) => {
                    size.get_or_insert(r.meta.size);
                    r.into_stream()
                }
                Err(object_store::Error::NotFound { .. }) if at == 0 => return Ok(None),
                Err(e) => return Err(self.error("GET", Some(hash), e)),
            };
            let size = size.expect("set above");
            // A task of the runtime receives the body while this thread hashes and writes what
            // came before (up to 256 pieces ahead): the network does not wait for the disk.
            let (tx, mut rx) = tokio::sync::mpsc::channel::<Result<Bytes, String>>(256);
            let patience = self.patience;
            let pump = self.rt.spawn(async move {
                loop {
                    let piece = match tokio::time::timeout(patience, body.next()).await {
                        Ok(Some(Ok(bytes))) => Ok(bytes),
                        Ok(Some(Err(e))) => Err(e.to_string()),
                        Ok(None) => break,
                        Err(_) => Err("no bytes in time".to_string()),
                    };
                    let last = piece.is_err();
                    if tx.send(piece).await.is_err() || last {
                        break;
                    }
                }
            });
            let broke = loop {
                match self.rt.block_on(rx.recv()) {
                    Some(Ok(bytes)) => {
                        if let Err(e) = sink(at, &bytes) {
                            pump.abort();
                            return Err(e);
                        }
                        at += bytes.len() as u64;
                        since = Instant::now();
                    }
                    Some(Err(e)) => break Some(e),
                    None => break None,
                }
            };
            if at >= size {
                return Ok(Some(at));
            }
            let why =
                self.redact(broke.unwrap_or_else(|| format!("ended at {at} of {size} bytes")));
            if since.elapsed() >= self.patience {
                log::error!("{}: GET of {hash}: {why}", self.url);
                return Err(io::Error::other(format!(
                    "{}: GET of {hash}: {why}",
                    self.url
                )));
            }
            log::debug!(
                "{}: GET of {hash} broke off at {at}: {why}; going on",
                self.url
            );
        }
    }

    /// What the object of `hash` actually hashes to (streamed, nothing kept).
    pub fn rehash(&self, hash: &Hash) -> io::Result<Hash> {
        let mut hasher = Sha256::new();
        let got = self.fetch(hash, &mut |_, bytes| {
            hasher.update(bytes);
            Ok(())
        })?;
        match got {
            Some(_) => Ok(Hash::from_digest(hasher)),
            None => Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("{}: no object {hash}", self.url),
            )),
        }
    }

    /// The objects whose hashes begin with `head` (two hex digits): hash, size, age.
    pub fn list(&self, head: &str) -> io::Result<Vec<(Hash, ObjectInfo)>> {
        let dir = Key::from(format!("{}sha256/{head}", self.prefix));
        let listed = self.list_all(&dir);
        let mut out = Vec::new();
        for m in listed {
            let m = m.map_err(|e| self.error("LIST", None, e))?;
            let name = m.location.filename().unwrap_or_default();
            if let Some(h) = Hash::from_hex(&format!("{head}{name}")) {
                out.push((
                    h,
                    ObjectInfo {
                        size: m.size,
                        modified_ns: m.last_modified.timestamp_nanos_opt().unwrap_or(0),
                    },
                ));
            }
        }
        Ok(out)
    }

    /// Every object below `dir` (all pages), or an error once the patience is over.
    fn list_all(&self, dir: &Key) -> Vec<object_store::Result<object_store::ObjectMeta>> {
        self.rt.block_on(async {
            tokio::time::timeout(
                self.patience,
                self.store.list(Some(dir)).collect::<Vec<_>>(),
            )
            .await
            .unwrap_or_else(|_| {
                vec![Err(object_store::Error::Generic {
                    store: "bucket",
                    source: "LIST: no answer in time".into(),
                })]
            })
        })
    }

    /// Deletes the object of `hash` (garbage collection only, with the index write lock held).
    pub fn delete(&self, hash: &Hash) -> io::Result<()> {
        match self.block(self.store.delete(&self.key(hash))) {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(self.error("DELETE", Some(hash), e)),
        }
    }

    /// Puts `bytes` under `hash`'s key as they are, overwriting: for tests that stage a
    /// damaged object.
    #[doc(hidden)]
    pub fn put_raw(&self, hash: &Hash, bytes: &[u8]) -> io::Result<()> {
        self.put_one(Bytes::copy_from_slice(bytes), hash, true)
            .map(drop)
    }
}

/// A multipart upload of a file still being written (see [`Remote::stream_begin`]).
pub struct StreamUpload {
    /// `None` once completed or aborted.
    upload: Option<Box<dyn object_store::MultipartUpload>>,
    /// Where an upload dropped unfinished is aborted.
    rt: tokio::runtime::Handle,
    key: Key,
    /// Bytes handed to parts so far (whole parts of [`PART`]).
    sent: u64,
    flying: VecDeque<tokio::task::JoinHandle<object_store::Result<()>>>,
    /// A part failed: the commit uploads the file as usual.
    broken: bool,
}

impl StreamUpload {
    fn upload(&mut self) -> &mut Box<dyn object_store::MultipartUpload> {
        self.upload.as_mut().expect("not finished yet")
    }
}

impl Drop for StreamUpload {
    /// A file given up (its writer failed, the daemon stops) aborts its upload in the
    /// background; a kill leaves it to the bucket's lifecycle rule.
    fn drop(&mut self) {
        for part in self.flying.drain(..) {
            part.abort();
        }
        if let Some(mut upload) = self.upload.take() {
            self.rt.spawn(async move {
                let _ = upload.abort().await;
            });
        }
    }
}

/// Where the upload of a file being written stands.
#[derive(Debug, Default)]
pub enum Streaming {
    /// Not begun (too small so far, or no bucket).
    #[default]
    Idle,
    On(StreamUpload),
    /// Given up for this file: it is uploaded at its commit.
    Off,
}

impl std::fmt::Debug for StreamUpload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "StreamUpload({}, {} bytes sent)", self.key, self.sent)
    }
}

/// `fut`, or an error once `patience` is over.
async fn in_time<T>(
    patience: Duration,
    fut: impl std::future::Future<Output = object_store::Result<T>>,
) -> object_store::Result<T> {
    match tokio::time::timeout(patience, fut).await {
        Ok(r) => r,
        Err(_) => Err(object_store::Error::Generic {
            store: "bucket",
            source: format!("no answer within {patience:?}").into(),
        }),
    }
}

/// Bytes `start..end` of `key` (fewer at the object's end) and the object's size; a body that
/// breaks off is asked for again for `patience`.
async fn range(
    store: Arc<dyn ObjectStore>,
    key: Key,
    start: u64,
    end: u64,
    patience: Duration,
) -> object_store::Result<(Bytes, u64)> {
    let deadline = Instant::now() + patience;
    loop {
        let opts = GetOptions {
            range: Some(GetRange::Bounded(start..end)),
            ..Default::default()
        };
        let got = match store.get_opts(&key, opts).await {
            Ok(r) => {
                let size = r.meta.size;
                r.bytes().await.map(|b| (b, size))
            }
            Err(e) => Err(e),
        };
        match got {
            Ok(v) => return Ok(v),
            Err(e @ object_store::Error::NotFound { .. }) => return Err(e),
            Err(e) if Instant::now() >= deadline => return Err(e),
            Err(_) => {
                // (The error itself is told if the patience runs out: with credentials cut.)
                log::debug!("{key}: range {start}..{end} failed; asking again");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}

/// The local cache of a bucket's content: whole objects as files in `DIR/sha256/…` (the same
/// layout as a blob directory), bounded by size, least recently opened first out.
#[derive(Debug)]
pub struct BlobCache {
    limit: u64,
    state: Mutex<CacheState>,
}

#[derive(Debug, Default)]
struct CacheState {
    used: u64,
    tick: u64,
    /// hash → (size, last use, verified since the daemon started).
    entries: HashMap<Hash, (u64, u64, bool)>,
    /// Content handed out open (one per open handle): not evicted while any of these lives.
    open: HashMap<Hash, Vec<Weak<File>>>,
}

impl BlobCache {
    /// The cache in `dir` (`dir/sha256/…`), taking stock of what an earlier daemon left there.
    /// `trusted`: the last stop was clean, so every file there is whole; otherwise each is
    /// re-hashed the first time it is opened (a power loss may have emptied it).
    pub fn load(dir: &Path, limit: u64, trusted: bool) -> io::Result<BlobCache> {
        let mut found = Vec::new();
        let root = dir.join("sha256");
        if let Ok(prefixes) = fs::read_dir(&root) {
            for p in prefixes.flatten() {
                let head = p.file_name().to_string_lossy().into_owned();
                for e in fs::read_dir(p.path())?.flatten() {
                    let name = e.file_name().to_string_lossy().into_owned();
                    if let (Some(h), Ok(m)) =
                        (Hash::from_hex(&format!("{head}{name}")), e.metadata())
                    {
                        let used = m.accessed().or_else(|_| m.modified()).ok();
                        found.push((used, h, m.len()));
                    }
                }
            }
        }
        found.sort_by_key(|(t, _, _)| *t);
        let mut state = CacheState::default();
        for (_, h, n) in found {
            state.tick += 1;
            state.used += n;
            state.entries.insert(h, (n, state.tick, trusted));
        }
        log::info!(
            "blob cache {}: {} content(s), {} MiB of at most {} MiB",
            dir.display(),
            state.entries.len(),
            state.used >> 20,
            limit >> 20
        );
        Ok(BlobCache {
            limit,
            state: Mutex::new(state),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, CacheState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Marks `hash` used now; returns whether it must be re-hashed before use (`None`: the
    /// cache does not know it).
    pub fn touch(&self, hash: &Hash) -> Option<bool> {
        let mut s = self.lock();
        s.tick += 1;
        let tick = s.tick;
        s.entries.get_mut(hash).map(|e| {
            e.1 = tick;
            !e.2
        })
    }

    /// Records that the cache file of `hash` holds its `size` verified bytes.
    pub fn insert(&self, hash: &Hash, size: u64) {
        let mut s = self.lock();
        s.tick += 1;
        let tick = s.tick;
        if let Some(old) = s.entries.insert(*hash, (size, tick, true)) {
            s.used -= old.0;
        }
        s.used += size;
    }

    /// Forgets `hash` (its file is gone or bad).
    pub fn forget(&self, hash: &Hash) {
        let mut s = self.lock();
        if let Some(old) = s.entries.remove(hash) {
            s.used -= old.0;
        }
    }

    /// Remembers that `file` (the content of `hash`) is open: it stays while `file` lives.
    /// (Only this content's list is tidied: an open is a request of its own.)
    pub fn opened(&self, hash: &Hash, file: &Arc<File>) {
        let mut s = self.lock();
        let handles = s.open.entry(*hash).or_default();
        handles.retain(|w| w.strong_count() > 0);
        handles.push(Arc::downgrade(file));
    }

    /// Drops least recently used content until the cache is within its bound again, skipping
    /// content that is open; `path` gives a hash's file. Returns what it removed.
    pub fn evict(&self, path: impl Fn(&Hash) -> PathBuf) -> Vec<Hash> {
        let victims = {
            let mut s = self.lock();
            if s.used <= self.limit {
                return Vec::new();
            }
            s.open.retain(|_, handles| {
                handles.retain(|w| w.strong_count() > 0);
                !handles.is_empty()
            });
            let mut order: Vec<(u64, Hash, u64)> = s
                .entries
                .iter()
                .filter(|(h, _)| !s.open.contains_key(*h))
                .map(|(h, (n, t, _))| (*t, *h, *n))
                .collect();
            order.sort_unstable();
            let mut over = s.used - self.limit;
            let mut victims = Vec::new();
            for (_, h, n) in order {
                if over == 0 {
                    break;
                }
                over = over.saturating_sub(n);
                s.used -= n;
                s.entries.remove(&h);
                victims.push(h);
            }
            if s.used > self.limit {
                log::info!(
                    "blob cache over its bound ({} MiB of {} MiB): the rest is open",
                    s.used >> 20,
                    self.limit >> 20
                );
            }
            victims
        };
        for h in &victims {
            let _ = fs::remove_file(path(h));
        }
        victims
    }

    /// Bytes the cache holds (for tests and the log).
    pub fn used(&self) -> u64 {
        self.lock().used
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// No credential the process was given reaches a log line or an error's text, whatever
    /// the server answered (its error body may quote them); a URL with credentials in it is
    /// refused without being echoed.
    #[test]
    fn credentials_are_cut_out_of_errors() {
        let vars: Vec<(String, String)> = [
            ("AWS_ACCESS_KEY_ID", "AKIDEXAMPLE1234"),
            ("AWS_SECRET_ACCESS_KEY", "s3cr3t/KEY+value"),
            ("AWS_SESSION_TOKEN", "FwoGZXIvYXdzEXAMPLETOKEN"),
            ("AWS_ENDPOINT_URL", "http://127.0.0.1:9"),
            ("AWS_ALLOW_HTTP", "true"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let remote = Remote::open_with("s3://bucket/prefix", &vars).unwrap();
        let body = "<Error><Code>SignatureDoesNotMatch</Code><AWSAccessKeyId>AKIDEXAMPLE1234\
                    </AWSAccessKeyId><CanonicalRequest>x-amz-security-token:\
                    FwoGZXIvYXdzEXAMPLETOKEN s3cr3t/KEY+value</CanonicalRequest></Error>";
        let e = object_store::Error::Generic {
            store: "S3",
            source: body.into(),
        };
        let text = remote.error("PUT", None, e).to_string();
        for (_, secret) in &vars[..3] {
            assert!(!text.contains(secret.as_str()), "{text}");
        }
        assert!(text.contains("SignatureDoesNotMatch"), "{text}");
        let e = Remote::open_with("s3://AKIDEXAMPLE1234:s3cr3t@bucket/p", &vars).unwrap_err();
        assert!(!e.to_string().contains("s3cr3t"), "{e}");
    }

    /// Every size up to S3's 5 TiB object limit (and so up to the default `--max-file-size`)
    /// fits in its 10,000 parts of at least 5 MiB, with at most `PARALLEL` × `PART` bytes in
    /// flight (or one part).
    #[test]
    fn parts_never_number_more_than_s3_takes() {
        let limit = 5u64 << 40;
        assert!(crate::fs::DEFAULT_MAX_FILE_SIZE <= limit);
        let mut sizes = vec![1, PART, MAX_PARTS * PART, MAX_PARTS * PART + 1, 100 << 30];
        sizes.extend((1..=64).map(|i| limit / 64 * i));
        sizes.push(crate::fs::DEFAULT_MAX_FILE_SIZE);
        for len in sizes {
            let part = part_size(len);
            assert!(len.div_ceil(part) <= MAX_PARTS, "{len}: {part}");
            assert!((5 << 20..=5 << 30).contains(&part), "{len}: {part}");
            assert_eq!(part % (1 << 20), 0);
            let flying = parts_in_flight(part);
            assert!((1..=PARALLEL).contains(&flying));
            assert!(flying == 1 || flying as u64 * part <= PARALLEL as u64 * PART);
        }
        assert_eq!(part_size(1 << 30), PART);
        assert_eq!(parts_in_flight(PART), PARALLEL);
    }

    /// The least recently opened content goes first; open content never does.
    #[test]
    fn eviction_is_lru_and_spares_open_content() {
        let dir = tempfile::tempdir().unwrap();
        let cache = BlobCache::load(dir.path(), 250, true).unwrap();
        let path = |h: &Hash| dir.path().join(h.to_hex());
        let hashes: Vec<Hash> = (0..4u8).map(|i| Hash::of(&[i])).collect();
        for h in &hashes {
            fs::write(path(h), [0u8; 100]).unwrap();
            cache.insert(h, 100);
        }
        // 0 is the oldest but open; 1 was used again.
        let open = Arc::new(File::open(path(&hashes[0])).unwrap());
        cache.opened(&hashes[0], &open);
        assert_eq!(cache.touch(&hashes[1]), Some(false));
        let gone = cache.evict(path);
        assert_eq!(gone, vec![hashes[2], hashes[3]]);
        assert_eq!(cache.used(), 200);
        assert!(path(&hashes[0]).exists() && !path(&hashes[2]).exists());
        // Closed, it may go.
        drop(open);
        cache.insert(&Hash::of(b"new"), 100);
        fs::write(path(&Hash::of(b"new")), [0u8; 100]).unwrap();
        assert_eq!(cache.evict(path), vec![hashes[0]]);
    }

    #[test]
    fn untrusted_entries_need_a_rehash() {
        let dir = tempfile::tempdir().unwrap();
        let h = Hash::of(b"x");
        let hex = h.to_hex();
        fs::create_dir_all(dir.path().join("sha256").join(&hex[..2])).unwrap();
        fs::write(
            dir.path().join("sha256").join(&hex[..2]).join(&hex[2..]),
            b"x",
        )
        .unwrap();
        let cache = BlobCache::load(dir.path(), 1 << 20, false).unwrap();
        assert_eq!(cache.touch(&h), Some(true));
        cache.insert(&h, 1);
        assert_eq!(cache.touch(&h), Some(false));
        assert_eq!(cache.touch(&Hash::of(b"y")), None);
    }

    #[test]
    fn bucket_urls() {
        assert!(is_bucket_url("s3://b/p"));
        assert!(!is_bucket_url("file:///x"));
        let e = Remote::open("s3:///nobucket").unwrap_err();
        assert!(e.to_string().contains("expected s3://BUCKET"), "{e}");
    }
}
