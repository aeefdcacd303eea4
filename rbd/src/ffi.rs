//! The C API of librados and librbd (Ceph 16.2 Pacific, `rados/librados.h` and
//! `rbd/librbd.h`), found with `dlopen`/`dlsym` at run time. This is the crate's only unsafe
//! code; every call states why it is sound.
//!
//! The libraries are loaded once per process, the first time a cluster is opened, and stay
//! loaded (librados starts threads that must never find their code unmapped).

#![allow(unsafe_code)]

use std::ffi::{CStr, CString, c_char, c_int, c_void};
use std::sync::OnceLock;

/// `rados_t`, `rados_ioctx_t`, `rbd_image_t`, `rbd_completion_t`: opaque handles.
pub(crate) type Handle = *mut c_void;

/// `rbd_callback_t`.
pub(crate) type Callback = unsafe extern "C" fn(completion: Handle, arg: *mut c_void);

/// `rbd_image_watcher_t` (`rbd/librbd.h`): a client watching an image.
#[repr(C)]
#[derive(Clone, Copy)]
pub(crate) struct Watcher {
    addr: *mut c_char,
    id: i64,
    cookie: u64,
}

/// `rbd_snap_info_t` (`rbd/librbd.h`): one snapshot of an image.
#[repr(C)]
#[derive(Clone, Copy)]
pub(crate) struct SnapInfo {
    id: u64,
    size: u64,
    name: *const c_char,
}

/// `RBD_LOCK_MODE_EXCLUSIVE`.
const LOCK_MODE_EXCLUSIVE: c_int = 0;

/// The callback of `rbd_diff_iterate2`: offset, length, whether the extent exists, argument.
pub(crate) type DiffCallback = unsafe extern "C" fn(u64, usize, c_int, *mut c_void) -> c_int;

macro_rules! api {
    ($( $lib:ident fn $name:ident ( $( $arg:ident : $ty:ty ),* ) -> $ret:ty; )*) => {
        /// The functions this crate uses, resolved from the two libraries.
        #[allow(non_snake_case, dead_code)]
        pub(crate) struct Api {
            $( pub(crate) $name: unsafe extern "C" fn( $( $ty ),* ) -> $ret, )*
        }

        impl Api {
            fn resolve(rados: *mut c_void, rbd: *mut c_void) -> Result<Self, String> {
                Ok(Self {
                    $( $name: {
                        let handle = match stringify!($lib) { "rados" => rados, _ => rbd };
                        let name = concat!(stringify!($name), "\0");
                        // SAFETY: `handle` is a live dlopen handle and `name` a NUL-terminated
                        // symbol name; dlsym only looks the symbol up.
                        let sym = unsafe { libc::dlsym(handle, name.as_ptr().cast()) };
                        if sym.is_null() {
                            return Err(format!(
                                "{} has no {}: Ceph 16.2 (Pacific) or newer is needed",
                                if stringify!($lib) == "rados" { "librados.so.2" } else { "librbd.so.1" },
                                stringify!($name)
                            ));
                        }
                        // SAFETY: the symbol is the C function of that name, whose signature
                        // in Ceph's headers is the one declared here; function and data
                        // pointers have the same size on the platforms Ceph supports.
                        unsafe { std::mem::transmute::<*mut c_void, unsafe extern "C" fn( $( $ty ),* ) -> $ret>(sym) }
                    }, )*
                })
            }
        }
    };
}

api! {
    rados fn rados_create(cluster: *mut Handle, id: *const c_char) -> c_int;
    rados fn rados_conf_read_file(cluster: Handle, path: *const c_char) -> c_int;
    rados fn rados_conf_set(cluster: Handle, option: *const c_char, value: *const c_char) -> c_int;
    rados fn rados_conf_get(cluster: Handle, option: *const c_char, buf: *mut c_char, len: usize) -> c_int;
    rados fn rados_connect(cluster: Handle) -> c_int;
    rados fn rados_get_instance_id(cluster: Handle) -> u64;
    rados fn rados_shutdown(cluster: Handle) -> ();
    rados fn rados_ioctx_create(cluster: Handle, pool: *const c_char, ioctx: *mut Handle) -> c_int;
    rados fn rados_ioctx_destroy(ioctx: Handle) -> ();
    rados fn rados_set_pool_full_try(ioctx: Handle) -> ();
    rbd fn rbd_create(ioctx: Handle, name: *const c_char, size: u64, order: *mut c_int) -> c_int;
    rbd fn rbd_remove(ioctx: Handle, name: *const c_char) -> c_int;
    rbd fn rbd_rename(ioctx: Handle, from: *const c_char, to: *const c_char) -> c_int;
    rbd fn rbd_list(ioctx: Handle, names: *mut c_char, size: *mut usize) -> c_int;
    rbd fn rbd_open(ioctx: Handle, name: *const c_char, image: *mut Handle, snap: *const c_char) -> c_int;
    rbd fn rbd_open_read_only(ioctx: Handle, name: *const c_char, image: *mut Handle, snap: *const c_char) -> c_int;
    rbd fn rbd_close(image: Handle) -> c_int;
    rbd fn rbd_get_modify_timestamp(image: Handle, at: *mut libc::timespec) -> c_int;
    rbd fn rbd_snap_create(image: Handle, name: *const c_char) -> c_int;
    rbd fn rbd_snap_remove(image: Handle, name: *const c_char) -> c_int;
    rbd fn rbd_snap_rename(image: Handle, from: *const c_char, to: *const c_char) -> c_int;
    rbd fn rbd_snap_list(image: Handle, snaps: *mut SnapInfo, max: *mut c_int) -> c_int;
    rbd fn rbd_snap_list_end(snaps: *mut SnapInfo) -> ();
    rbd fn rbd_snap_get_timestamp(image: Handle, id: u64, at: *mut libc::timespec) -> c_int;
    rbd fn rbd_get_size(image: Handle, size: *mut u64) -> c_int;
    rbd fn rbd_resize(image: Handle, size: u64) -> c_int;
    rbd fn rbd_get_stripe_unit(image: Handle, unit: *mut u64) -> c_int;
    rbd fn rbd_aio_write_zeroes(image: Handle, off: u64, len: usize, completion: Handle, zero_flags: c_int, op_flags: c_int) -> c_int;
    rbd fn rbd_aio_create_completion(arg: *mut c_void, cb: Option<Callback>, completion: *mut Handle) -> c_int;
    rbd fn rbd_aio_wait_for_complete(completion: Handle) -> c_int;
    rbd fn rbd_aio_get_return_value(completion: Handle) -> isize;
    rbd fn rbd_aio_release(completion: Handle) -> ();
    rbd fn rbd_aio_read(image: Handle, off: u64, len: usize, buf: *mut c_char, completion: Handle) -> c_int;
    rbd fn rbd_aio_write(image: Handle, off: u64, len: usize, buf: *const c_char, completion: Handle) -> c_int;
    rbd fn rbd_aio_discard(image: Handle, off: u64, len: u64, completion: Handle) -> c_int;
    rbd fn rbd_aio_flush(image: Handle, completion: Handle) -> c_int;
    rbd fn rbd_lock_acquire(image: Handle, mode: c_int) -> c_int;
    rbd fn rbd_lock_release(image: Handle) -> c_int;
    rbd fn rbd_is_exclusive_lock_owner(image: Handle, owner: *mut c_int) -> c_int;
    rbd fn rbd_lock_get_owners(image: Handle, mode: *mut c_int, owners: *mut *mut c_char, max: *mut usize) -> c_int;
    rbd fn rbd_lock_get_owners_cleanup(owners: *mut *mut c_char, count: usize) -> ();
    rbd fn rbd_lock_break(image: Handle, mode: c_int, owner: *const c_char) -> c_int;
    rbd fn rbd_watchers_list(image: Handle, watchers: *mut Watcher, max: *mut usize) -> c_int;
    rbd fn rbd_watchers_list_cleanup(watchers: *mut Watcher, count: usize) -> ();
    rbd fn rbd_metadata_get(image: Handle, key: *const c_char, value: *mut c_char, len: *mut usize) -> c_int;
    rbd fn rbd_metadata_set(image: Handle, key: *const c_char, value: *const c_char) -> c_int;
    rbd fn rbd_metadata_remove(image: Handle, key: *const c_char) -> c_int;
    rbd fn rbd_diff_iterate2(image: Handle, from_snap: *const c_char, off: u64, len: u64, include_parent: u8, whole_object: u8, cb: DiffCallback, arg: *mut c_void) -> c_int;
}

/// The two libraries, or why they could not be loaded.
pub(crate) fn api() -> Result<&'static Api, String> {
    static API: OnceLock<Result<Api, String>> = OnceLock::new();
    API.get_or_init(load).as_ref().map_err(Clone::clone)
}

fn open(name: &CStr, package: &str) -> Result<*mut c_void, String> {
    // SAFETY: `name` is NUL-terminated; dlopen runs the library's initialisers, which for
    // librados and librbd only set up static state.
    let handle = unsafe { libc::dlopen(name.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
    if handle.is_null() {
        // SAFETY: dlerror returns NULL or a NUL-terminated message valid until the next call
        // on this thread, read at once.
        let why = unsafe {
            let e = libc::dlerror();
            if e.is_null() {
                String::from("unknown error")
            } else {
                CStr::from_ptr(e).to_string_lossy().into_owned()
            }
        };
        return Err(format!(
            "cannot load {} ({why}): install Ceph's client library (apt-get install {package})",
            name.to_string_lossy()
        ));
    }
    Ok(handle)
}

fn load() -> Result<Api, String> {
    let rados = open(c"librados.so.2", "librados2")?;
    let rbd = open(c"librbd.so.1", "librbd1")?;
    // The handles are never closed (see the module's header).
    Api::resolve(rados, rbd)
}

/// A Rust string as a C string; `what` names it in the error.
pub(crate) fn cstring(s: &str, what: &str) -> std::io::Result<CString> {
    CString::new(s).map_err(|_| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("{what} {s:?} contains a NUL byte"),
        )
    })
}

/// Calls `attempt` with a buffer of `room` copies of `fresh` and the room in `count`; when
/// librbd answers -ERANGE with a larger `count` (what it needs), calls it again with that
/// much. Returns librbd's answer, the buffer, and the count it reported (at most the room).
fn sized<T: Clone>(
    mut room: usize,
    fresh: T,
    mut attempt: impl FnMut(&mut [T], &mut usize) -> c_int,
) -> (c_int, Vec<T>, usize) {
    loop {
        let mut buf = vec![fresh.clone(); room];
        let mut count = room;
        let rc = attempt(&mut buf, &mut count);
        if rc == -libc::ERANGE && count > room {
            room = count;
            continue;
        }
        return (rc, buf, count.min(room));
    }
}

/// An error librados or librbd returned: what failed, and the errno.
#[derive(Debug)]
pub(crate) struct CephError {
    pub(crate) errno: i32,
    message: String,
}

impl std::fmt::Display for CephError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for CephError {}

/// `rc` as a result: a negative value is `-errno`, reported with `what`.
fn check(rc: i64, what: &dyn std::fmt::Display) -> std::io::Result<i64> {
    if rc >= 0 {
        return Ok(rc);
    }
    let errno = i32::try_from(-rc).unwrap_or(libc::EIO);
    let os = std::io::Error::from_raw_os_error(errno);
    Err(std::io::Error::new(
        os.kind(),
        CephError {
            errno,
            message: format!("{what}: {os}"),
        },
    ))
}

/// A `timespec` from librbd as a time.
fn system_time(at: &libc::timespec) -> std::time::SystemTime {
    std::time::UNIX_EPOCH
        + std::time::Duration::new(
            u64::try_from(at.tv_sec).unwrap_or(0),
            u32::try_from(at.tv_nsec).unwrap_or(0),
        )
}

/// A connection to a cluster (`rados_t`), shut down when the last pool and image using it
/// are gone.
pub struct Cluster {
    api: &'static Api,
    handle: Handle,
}

// SAFETY: librados handles are thread-safe: the library serialises access internally, and
// the C API is documented for use from many threads at once.
unsafe impl Send for Cluster {}
// SAFETY: as above.
unsafe impl Sync for Cluster {}

impl Cluster {
    /// Connects as client `id` (without `client.`) with the configuration file `conf`, then
    /// the `options` (`rados_conf_set` names and values).
    pub fn connect(
        conf: &std::path::Path,
        id: &str,
        options: &[(&str, &str)],
    ) -> std::io::Result<std::sync::Arc<Self>> {
        let api = api().map_err(std::io::Error::other)?;
        let c_id = cstring(id, "the client id")?;
        let mut handle: Handle = std::ptr::null_mut();
        // SAFETY: `handle` is a valid out-pointer; `c_id` is NUL-terminated and read during
        // the call.
        let rc = unsafe { (api.rados_create)(&mut handle, c_id.as_ptr()) };
        check(
            i64::from(rc),
            &format_args!("cannot create a Ceph client {id}"),
        )?;
        // From here on, `Drop` shuts the handle down on every error path.
        let cluster = Self { api, handle };
        let c_conf = cstring(&conf.to_string_lossy(), "the Ceph configuration path")?;
        // SAFETY: `handle` is a created, unconnected cluster; the path is NUL-terminated.
        let rc = unsafe { (api.rados_conf_read_file)(cluster.handle, c_conf.as_ptr()) };
        check(
            i64::from(rc),
            &format_args!("cannot read {}", conf.display()),
        )?;
        for (name, value) in options {
            let (n, v) = (
                cstring(name, "an option")?,
                cstring(value, "an option value")?,
            );
            // SAFETY: as above; both strings are NUL-terminated and copied by librados.
            let rc = unsafe { (api.rados_conf_set)(cluster.handle, n.as_ptr(), v.as_ptr()) };
            check(
                i64::from(rc),
                &format_args!("cannot set the Ceph option {name} = {value}"),
            )?;
        }
        // SAFETY: a configured, unconnected cluster handle.
        let rc = unsafe { (api.rados_connect)(cluster.handle) };
        check(
            i64::from(rc),
            &format_args!(
                "cannot connect to the Ceph cluster of {} as client.{id}",
                conf.display()
            ),
        )?;
        Ok(std::sync::Arc::new(cluster))
    }

    /// This client's id in the cluster (`client.ID`, as watchers and lock owners name it).
    pub fn instance_id(&self) -> u64 {
        // SAFETY: a connected cluster handle.
        unsafe { (self.api.rados_get_instance_id)(self.handle) }
    }

    /// The value of configuration option `name` as this client sees it (its configuration
    /// file and defaults).
    pub fn conf_get(&self, name: &str) -> std::io::Result<String> {
        let c_name = cstring(name, "the option name")?;
        let mut buf = vec![0u8; 256];
        // SAFETY: a live cluster handle; `buf` has room for `len` bytes, which librados
        // fills with a NUL-terminated value (or -ENAMETOOLONG).
        let rc = unsafe {
            (self.api.rados_conf_get)(
                self.handle,
                c_name.as_ptr(),
                buf.as_mut_ptr().cast(),
                buf.len(),
            )
        };
        check(
            i64::from(rc),
            &format_args!("cannot read the Ceph option {name}"),
        )?;
        let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
        Ok(String::from_utf8_lossy(&buf[..end]).into_owned())
    }

    /// The pool `name`.
    pub fn pool(self: &std::sync::Arc<Self>, name: &str) -> std::io::Result<std::sync::Arc<Pool>> {
        let c_name = cstring(name, "the pool name")?;
        let mut ioctx: Handle = std::ptr::null_mut();
        // SAFETY: a connected cluster; `ioctx` is a valid out-pointer; the name is
        // NUL-terminated.
        let rc = unsafe { (self.api.rados_ioctx_create)(self.handle, c_name.as_ptr(), &mut ioctx) };
        check(
            i64::from(rc),
            &format_args!("cannot open the Ceph pool {name}"),
        )?;
        Ok(std::sync::Arc::new(Pool {
            cluster: std::sync::Arc::clone(self),
            ioctx,
            name: name.to_owned(),
        }))
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // SAFETY: the handle came from rados_create and every pool and image holding it is
        // gone (they keep the `Arc`); it is shut down exactly once.
        unsafe { (self.api.rados_shutdown)(self.handle) };
    }
}

/// A pool (`rados_ioctx_t`).
pub struct Pool {
    cluster: std::sync::Arc<Cluster>,
    ioctx: Handle,
    name: String,
}

// SAFETY: an I/O context may be used from many threads at once (librados serialises
// internally); this type never changes its settings after creation.
unsafe impl Send for Pool {}
// SAFETY: as above.
unsafe impl Sync for Pool {}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "rbd:{}", self.name)
    }
}

impl Pool {
    /// The pool's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    fn api(&self) -> &'static Api {
        self.cluster.api
    }

    /// The cluster the pool is in.
    pub fn cluster(&self) -> &std::sync::Arc<Cluster> {
        &self.cluster
    }

    /// Writes to this pool fail with `ENOSPC` (or `EDQUOT` for a quota) while it is full,
    /// instead of waiting until it has room (librados's default). Images opened afterwards
    /// inherit it.
    pub fn fail_when_full(&self) {
        // SAFETY: a live ioctx; the call only sets a flag on it.
        unsafe { (self.api().rados_set_pool_full_try)(self.ioctx) }
    }

    /// Creates image `name` of `size` bytes with the cluster's default features and object
    /// size.
    pub fn create_image(&self, name: &str, size: u64) -> std::io::Result<()> {
        let c_name = cstring(name, "the image name")?;
        let mut order: c_int = 0;
        // SAFETY: a live ioctx; the name is NUL-terminated; order 0 picks the default.
        let rc = unsafe { (self.api().rbd_create)(self.ioctx, c_name.as_ptr(), size, &mut order) };
        check(
            i64::from(rc),
            &format_args!("cannot create RBD image {}/{name}", self.name),
        )
        .map(drop)
    }

    /// Removes image `name` (it must have no snapshots).
    pub fn remove_image(&self, name: &str) -> std::io::Result<()> {
        let c_name = cstring(name, "the image name")?;
        // SAFETY: a live ioctx; the name is NUL-terminated.
        let rc = unsafe { (self.api().rbd_remove)(self.ioctx, c_name.as_ptr()) };
        check(
            i64::from(rc),
            &format_args!("cannot remove RBD image {}/{name}", self.name),
        )
        .map(drop)
    }

    /// Renames image `from` to `to`.
    pub fn rename_image(&self, from: &str, to: &str) -> std::io::Result<()> {
        let (f, t) = (
            cstring(from, "the image name")?,
            cstring(to, "the image name")?,
        );
        // SAFETY: a live ioctx; both names are NUL-terminated.
        let rc = unsafe { (self.api().rbd_rename)(self.ioctx, f.as_ptr(), t.as_ptr()) };
        check(
            i64::from(rc),
            &format_args!("cannot rename RBD image {}/{from} to {to}", self.name),
        )
        .map(drop)
    }

    /// The names of the pool's images.
    pub fn images(&self) -> std::io::Result<Vec<String>> {
        let (rc, buf, _) = sized(1024, 0u8, |buf, got| {
            // SAFETY: `buf` has room for `got` bytes; librbd writes at most that many (NUL-
            // separated names) or returns -ERANGE with the size it needs in `got`.
            unsafe { (self.api().rbd_list)(self.ioctx, buf.as_mut_ptr().cast(), got) }
        });
        let n = usize::try_from(check(
            i64::from(rc),
            &format_args!("cannot list the RBD images of pool {}", self.name),
        )?)
        .unwrap_or(0)
        .min(buf.len());
        Ok(buf[..n]
            .split(|&b| b == 0)
            .filter(|s| !s.is_empty())
            .map(|s| String::from_utf8_lossy(s).into_owned())
            .collect())
    }

    /// Opens image `name` for reading and writing.
    pub fn open(self: &std::sync::Arc<Self>, name: &str) -> std::io::Result<Image> {
        self.open_as(name, None, false)
    }

    /// Opens image `name` read-only: its head (`snapshot` None) or one of its snapshots.
    /// A read-only open neither watches the image nor takes its lock.
    pub fn open_read_only(
        self: &std::sync::Arc<Self>,
        name: &str,
        snapshot: Option<&str>,
    ) -> std::io::Result<Image> {
        self.open_as(name, snapshot, true)
    }

    fn open_as(
        self: &std::sync::Arc<Self>,
        name: &str,
        snapshot: Option<&str>,
        read_only: bool,
    ) -> std::io::Result<Image> {
        let c_name = cstring(name, "the image name")?;
        let c_snap = snapshot
            .map(|s| cstring(s, "the snapshot name"))
            .transpose()?;
        let snap_ptr = c_snap.as_ref().map_or(std::ptr::null(), |s| s.as_ptr());
        let open = if read_only {
            self.api().rbd_open_read_only
        } else {
            self.api().rbd_open
        };
        let mut handle: Handle = std::ptr::null_mut();
        // SAFETY: a live ioctx; `handle` is a valid out-pointer; the names are NUL-terminated
        // (a NULL snapshot name opens the image head).
        let rc = unsafe { open(self.ioctx, c_name.as_ptr(), &mut handle, snap_ptr) };
        let spec = match snapshot {
            Some(s) => format!("{name}@{s}"),
            None => name.to_owned(),
        };
        check(
            i64::from(rc),
            &format_args!("cannot open RBD image {}/{spec}", self.name),
        )?;
        Ok(Image {
            pool: std::sync::Arc::clone(self),
            handle,
            name: spec,
            doomed: false,
        })
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        // SAFETY: the ioctx came from rados_ioctx_create, and every image opened in it holds
        // this pool's `Arc`, so none is open any more; destroyed exactly once.
        unsafe { (self.api().rados_ioctx_destroy)(self.ioctx) };
    }
}

/// An open RBD image (`rbd_image_t`).
pub struct Image {
    pool: std::sync::Arc<Pool>,
    handle: Handle,
    name: String,
    /// Removed from the pool once closed ([`remove_when_closed`](Image::remove_when_closed)).
    doomed: bool,
}

// SAFETY: librbd image handles may be used from many threads at once: the library takes its
// own locks around image state, and aio calls are documented as thread-safe.
unsafe impl Send for Image {}
// SAFETY: as above.
unsafe impl Sync for Image {}

impl std::fmt::Debug for Image {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "rbd:{}/{}", self.pool.name, self.name)
    }
}

impl Image {
    fn api(&self) -> &'static Api {
        self.pool.api()
    }

    /// Removes the image from the pool once this handle is closed (an image that another
    /// one replaced, kept open until its caller has wiped it).
    pub fn remove_when_closed(mut self) -> Self {
        self.doomed = true;
        self
    }

    /// The pool the image is in.
    pub fn pool(&self) -> &std::sync::Arc<Pool> {
        &self.pool
    }

    /// `pool/name`, for messages.
    pub fn spec(&self) -> String {
        format!("{}/{}", self.pool.name, self.name)
    }

    /// The image's size in bytes.
    pub fn size(&self) -> std::io::Result<u64> {
        let mut size = 0u64;
        // SAFETY: an open image; `size` is a valid out-pointer.
        let rc = unsafe { (self.api().rbd_get_size)(self.handle, &mut size) };
        check(
            i64::from(rc),
            &format_args!("cannot read the size of RBD image {}", self.spec()),
        )?;
        Ok(size)
    }

    /// Sets the image's size.
    pub fn resize(&self, size: u64) -> std::io::Result<()> {
        // SAFETY: an open image.
        let rc = unsafe { (self.api().rbd_resize)(self.handle, size) };
        check(
            i64::from(rc),
            &format_args!("cannot resize RBD image {} to {size} bytes", self.spec()),
        )
        .map(drop)
    }

    /// The size of the image's objects (its stripe unit): a discard frees whole objects.
    pub fn object_size(&self) -> std::io::Result<u64> {
        let mut unit = 0u64;
        // SAFETY: an open image; `unit` is a valid out-pointer.
        let rc = unsafe { (self.api().rbd_get_stripe_unit)(self.handle, &mut unit) };
        check(
            i64::from(rc),
            &format_args!("cannot read the object size of RBD image {}", self.spec()),
        )?;
        Ok(unit)
    }

    /// Writes zeros over `offset..offset+len` (librbd may free whole objects).
    pub fn write_zeroes(&self, offset: u64, len: u64) -> std::io::Result<()> {
        let len = usize::try_from(len).map_err(std::io::Error::other)?;
        self.aio(
            &format_args!("RBD image {}: write zeros {offset}+{len}", self.spec()),
            // SAFETY: an open image; no buffer.
            |c| unsafe { (self.api().rbd_aio_write_zeroes)(self.handle, offset, len, c, 0, 0) },
        )
        .map(drop)
    }

    /// Submits one aio request with `submit` and waits for it: the buffers it names are
    /// borrowed by the caller for the whole call, so they outlive the request.
    fn aio(
        &self,
        what: &dyn std::fmt::Display,
        submit: impl FnOnce(Handle) -> c_int,
    ) -> std::io::Result<i64> {
        let api = self.api();
        let mut completion: Handle = std::ptr::null_mut();
        // SAFETY: a NULL argument and no callback make a completion that is only waited on;
        // `completion` is a valid out-pointer.
        let rc =
            unsafe { (api.rbd_aio_create_completion)(std::ptr::null_mut(), None, &mut completion) };
        check(i64::from(rc), what)?;
        let submitted = check(i64::from(submit(completion)), what);
        if submitted.is_ok() {
            // SAFETY: a submitted completion; this returns once librbd has finished with the
            // request and its buffer.
            unsafe { (api.rbd_aio_wait_for_complete)(completion) };
        }
        // SAFETY: the completion is complete (or was never submitted); its value is read
        // before it is released, exactly once.
        let value = unsafe { (api.rbd_aio_get_return_value)(completion) };
        // SAFETY: as above.
        unsafe { (api.rbd_aio_release)(completion) };
        submitted?;
        check(value as i64, what)
    }

    /// Reads `buf.len()` bytes at `offset` (within the image).
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        let (ptr, len) = (buf.as_mut_ptr(), buf.len());
        let n = self.aio(
            &format_args!("RBD image {}: read {offset}+{len}", self.spec()),
            // SAFETY: `buf` is writable for `len` bytes and borrowed until `aio` returns,
            // which is after librbd completed the read.
            |c| unsafe { (self.api().rbd_aio_read)(self.handle, offset, len, ptr.cast(), c) },
        )?;
        if usize::try_from(n).ok() != Some(len) {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                format!(
                    "RBD image {}: read {offset}+{len} returned {n} bytes",
                    self.spec()
                ),
            ));
        }
        Ok(())
    }

    /// Writes all of `data` at `offset` (within the image).
    pub fn write_at(&self, data: &[u8], offset: u64) -> std::io::Result<()> {
        let (ptr, len) = (data.as_ptr(), data.len());
        self.aio(
            &format_args!("RBD image {}: write {offset}+{len}", self.spec()),
            // SAFETY: `data` is readable for `len` bytes and borrowed until `aio` returns.
            |c| unsafe { (self.api().rbd_aio_write)(self.handle, offset, len, ptr.cast(), c) },
        )
        .map(drop)
    }

    /// Discards `offset..offset+len`: it reads as zeros afterwards.
    pub fn discard(&self, offset: u64, len: u64) -> std::io::Result<()> {
        self.aio(
            &format_args!("RBD image {}: discard {offset}+{len}", self.spec()),
            // SAFETY: an open image; no buffer.
            |c| unsafe { (self.api().rbd_aio_discard)(self.handle, offset, len, c) },
        )
        .map(drop)
    }

    /// Makes every write completed before the call durable in the cluster.
    pub fn flush(&self) -> std::io::Result<()> {
        self.aio(
            &format_args!("RBD image {}: flush", self.spec()),
            // SAFETY: an open image; no buffer.
            |c| unsafe { (self.api().rbd_aio_flush)(self.handle, c) },
        )
        .map(drop)
    }

    /// Takes the image's exclusive lock and keeps it (librbd then hands it to no other
    /// client that asks): until [`lock_release`](Self::lock_release), the image is closed, or
    /// another client breaks it. Fails while another client holds it.
    pub fn lock_acquire(&self) -> std::io::Result<()> {
        // SAFETY: an open image; the mode is one of librbd's.
        let rc = unsafe { (self.api().rbd_lock_acquire)(self.handle, LOCK_MODE_EXCLUSIVE) };
        check(
            i64::from(rc),
            &format_args!(
                "cannot take the exclusive lock of RBD image {}",
                self.spec()
            ),
        )
        .map(drop)
    }

    /// Releases the exclusive lock.
    pub fn lock_release(&self) -> std::io::Result<()> {
        // SAFETY: an open image.
        let rc = unsafe { (self.api().rbd_lock_release)(self.handle) };
        check(
            i64::from(rc),
            &format_args!(
                "cannot release the exclusive lock of RBD image {}",
                self.spec()
            ),
        )
        .map(drop)
    }

    /// Whether this client holds the exclusive lock.
    pub fn is_lock_owner(&self) -> std::io::Result<bool> {
        let mut owner: c_int = 0;
        // SAFETY: an open image; `owner` is a valid out-pointer.
        let rc = unsafe { (self.api().rbd_is_exclusive_lock_owner)(self.handle, &mut owner) };
        check(
            i64::from(rc),
            &format_args!("cannot tell who holds RBD image {}", self.spec()),
        )?;
        Ok(owner != 0)
    }

    /// The clients holding the image's lock, as librbd names them (empty when unlocked).
    pub fn lock_owners(&self) -> std::io::Result<Vec<String>> {
        let mut mode: c_int = 0;
        let (rc, mut owners, count) = sized(4, std::ptr::null_mut::<c_char>(), |owners, count| {
            // SAFETY: `owners` has room for `count` pointers; librbd fills at most that many
            // with strings it allocates (freed by the cleanup call below), or says how many
            // it needs with -ERANGE.
            unsafe {
                (self.api().rbd_lock_get_owners)(self.handle, &mut mode, owners.as_mut_ptr(), count)
            }
        });
        if rc == -libc::ENOENT {
            return Ok(Vec::new());
        }
        check(
            i64::from(rc),
            &format_args!("cannot list the lock owners of RBD image {}", self.spec()),
        )?;
        let names = owners[..count]
            .iter()
            .filter(|p| !p.is_null())
            // SAFETY: each non-NULL entry is a NUL-terminated string librbd allocated, read
            // before the cleanup below frees it.
            .map(|&p| unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned())
            .collect();
        // SAFETY: the array and the `count` strings librbd filled in, freed once.
        unsafe { (self.api().rbd_lock_get_owners_cleanup)(owners.as_mut_ptr(), count) };
        Ok(names)
    }

    /// Breaks the exclusive lock of `owner` (as [`lock_owners`](Self::lock_owners) names
    /// it). librbd blocklists that client (`rbd_blocklist_on_break_lock`, on by default), so
    /// it can never write to the cluster again, even if it is alive.
    pub fn lock_break(&self, owner: &str) -> std::io::Result<()> {
        let c_owner = cstring(owner, "the lock owner")?;
        // SAFETY: an open image; the owner is NUL-terminated.
        let rc = unsafe {
            (self.api().rbd_lock_break)(self.handle, LOCK_MODE_EXCLUSIVE, c_owner.as_ptr())
        };
        check(
            i64::from(rc),
            &format_args!(
                "cannot break the lock of {owner} on RBD image {}",
                self.spec()
            ),
        )
        .map(drop)
    }

    /// The clients watching the image (each client that has it open): id and address.
    pub fn watchers(&self) -> std::io::Result<Vec<(i64, String)>> {
        let empty = Watcher {
            addr: std::ptr::null_mut(),
            id: 0,
            cookie: 0,
        };
        let (rc, mut list, count) = sized(8, empty, |list, count| {
            // SAFETY: `list` has room for `count` entries; librbd fills at most that many
            // (their addresses allocated by it and freed by the cleanup call), or says how
            // many it needs with -ERANGE.
            unsafe { (self.api().rbd_watchers_list)(self.handle, list.as_mut_ptr(), count) }
        });
        check(
            i64::from(rc),
            &format_args!("cannot list the watchers of RBD image {}", self.spec()),
        )?;
        let watchers = list[..count]
            .iter()
            .map(|w| {
                let addr = if w.addr.is_null() {
                    String::new()
                } else {
                    // SAFETY: a NUL-terminated string librbd allocated, read before the
                    // cleanup frees it.
                    unsafe { CStr::from_ptr(w.addr) }
                        .to_string_lossy()
                        .into_owned()
                };
                (w.id, addr)
            })
            .collect();
        // SAFETY: the entries librbd filled in, freed once.
        unsafe { (self.api().rbd_watchers_list_cleanup)(list.as_mut_ptr(), count) };
        Ok(watchers)
    }

    /// The image metadata value of `key`, if set.
    pub fn metadata_get(&self, key: &str) -> std::io::Result<Option<String>> {
        let c_key = cstring(key, "the metadata key")?;
        let (rc, value, _) = sized(256, 0u8, |value, got| {
            // SAFETY: `value` has room for `got` bytes; librbd writes the NUL-terminated
            // value there, or says how long it is with -ERANGE.
            unsafe {
                (self.api().rbd_metadata_get)(
                    self.handle,
                    c_key.as_ptr(),
                    value.as_mut_ptr().cast(),
                    got,
                )
            }
        });
        if rc == -libc::ENOENT {
            return Ok(None);
        }
        check(
            i64::from(rc),
            &format_args!("cannot read metadata {key} of RBD image {}", self.spec()),
        )?;
        let end = value.iter().position(|&b| b == 0).unwrap_or(value.len());
        Ok(Some(String::from_utf8_lossy(&value[..end]).into_owned()))
    }

    /// Sets image metadata `key` to `value`.
    pub fn metadata_set(&self, key: &str, value: &str) -> std::io::Result<()> {
        let (k, v) = (
            cstring(key, "the metadata key")?,
            cstring(value, "the metadata value")?,
        );
        // SAFETY: an open image; both strings are NUL-terminated and copied by librbd.
        let rc = unsafe { (self.api().rbd_metadata_set)(self.handle, k.as_ptr(), v.as_ptr()) };
        check(
            i64::from(rc),
            &format_args!("cannot set metadata {key} of RBD image {}", self.spec()),
        )
        .map(drop)
    }

    /// Removes image metadata `key` (absent: nothing to do).
    pub fn metadata_remove(&self, key: &str) -> std::io::Result<()> {
        let k = cstring(key, "the metadata key")?;
        // SAFETY: an open image; the key is NUL-terminated.
        let rc = unsafe { (self.api().rbd_metadata_remove)(self.handle, k.as_ptr()) };
        if rc == -libc::ENOENT {
            return Ok(());
        }
        check(
            i64::from(rc),
            &format_args!("cannot remove metadata {key} of RBD image {}", self.spec()),
        )
        .map(drop)
    }

    /// When the image was last written.
    pub fn modified(&self) -> std::io::Result<std::time::SystemTime> {
        let mut at = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: an open image; `at` is a valid out-pointer.
        let rc = unsafe { (self.api().rbd_get_modify_timestamp)(self.handle, &mut at) };
        check(
            i64::from(rc),
            &format_args!("cannot read when RBD image {} changed", self.spec()),
        )?;
        Ok(system_time(&at))
    }

    /// Takes snapshot `name` of the image (of what has been written; flush first for what
    /// is still cached).
    pub fn snap_create(&self, name: &str) -> std::io::Result<()> {
        let c = cstring(name, "the snapshot name")?;
        // SAFETY: an open image; the name is NUL-terminated.
        let rc = unsafe { (self.api().rbd_snap_create)(self.handle, c.as_ptr()) };
        check(
            i64::from(rc),
            &format_args!("cannot take snapshot {name} of RBD image {}", self.spec()),
        )
        .map(drop)
    }

    /// Removes snapshot `name`.
    pub fn snap_remove(&self, name: &str) -> std::io::Result<()> {
        let c = cstring(name, "the snapshot name")?;
        // SAFETY: an open image; the name is NUL-terminated.
        let rc = unsafe { (self.api().rbd_snap_remove)(self.handle, c.as_ptr()) };
        check(
            i64::from(rc),
            &format_args!("cannot remove snapshot {name} of RBD image {}", self.spec()),
        )
        .map(drop)
    }

    /// Renames snapshot `from` to `to` (refused with `EEXIST` if `to` exists).
    pub fn snap_rename(&self, from: &str, to: &str) -> std::io::Result<()> {
        let (f, t) = (
            cstring(from, "the snapshot name")?,
            cstring(to, "the snapshot name")?,
        );
        // SAFETY: an open image; both names are NUL-terminated.
        let rc = unsafe { (self.api().rbd_snap_rename)(self.handle, f.as_ptr(), t.as_ptr()) };
        check(
            i64::from(rc),
            &format_args!(
                "cannot rename snapshot {from} of RBD image {} to {to}",
                self.spec()
            ),
        )
        .map(drop)
    }

    /// The image's snapshots: name and when each was taken, in the order librbd lists them.
    pub fn snapshots(&self) -> std::io::Result<Vec<(String, std::time::SystemTime)>> {
        let empty = SnapInfo {
            id: 0,
            size: 0,
            name: std::ptr::null(),
        };
        let mut room: c_int = 16;
        loop {
            let mut list = vec![empty; usize::try_from(room).unwrap_or(0)];
            let mut max = room;
            // SAFETY: `list` has room for `max` entries; librbd fills at most that many (their
            // names allocated by it, freed by rbd_snap_list_end) plus an end marker, or says
            // how many it needs with -ERANGE.
            let rc =
                unsafe { (self.api().rbd_snap_list)(self.handle, list.as_mut_ptr(), &mut max) };
            if rc == -libc::ERANGE && max > room {
                room = max + 1;
                continue;
            }
            let n = usize::try_from(check(
                i64::from(rc),
                &format_args!("cannot list the snapshots of RBD image {}", self.spec()),
            )?)
            .unwrap_or(0)
            .min(list.len());
            let mut out = Vec::with_capacity(n);
            let mut failed = None;
            for s in &list[..n] {
                // SAFETY: a NUL-terminated name librbd allocated, read before the end call
                // frees it.
                let name = unsafe { CStr::from_ptr(s.name) }
                    .to_string_lossy()
                    .into_owned();
                let mut at = libc::timespec {
                    tv_sec: 0,
                    tv_nsec: 0,
                };
                // SAFETY: an open image, a snapshot id it listed, a valid out-pointer.
                let rc = unsafe { (self.api().rbd_snap_get_timestamp)(self.handle, s.id, &mut at) };
                if rc < 0 && failed.is_none() {
                    failed = Some((rc, name.clone()));
                }
                out.push((name, system_time(&at)));
            }
            // SAFETY: the list librbd filled in, freed once.
            unsafe { (self.api().rbd_snap_list_end)(list.as_mut_ptr()) };
            if let Some((rc, name)) = failed {
                check(
                    i64::from(rc),
                    &format_args!(
                        "cannot read when snapshot {name} of {} was taken",
                        self.spec()
                    ),
                )?;
            }
            return Ok(out);
        }
    }

    /// The allocated runs (offset, length) within `offset..offset+len`, in order.
    pub fn allocated(&self, offset: u64, len: u64) -> std::io::Result<Vec<(u64, u64)>> {
        unsafe extern "C" fn collect(
            off: u64,
            len: usize,
            exists: c_int,
            arg: *mut c_void,
        ) -> c_int {
            // SAFETY: `arg` is the `Vec` passed below, alive and used by this callback only
            // for the duration of rbd_diff_iterate2, which calls it on the calling thread.
            let runs = unsafe { &mut *arg.cast::<Vec<(u64, u64)>>() };
            if exists != 0 {
                runs.push((off, len as u64));
            }
            0
        }
        let mut runs: Vec<(u64, u64)> = Vec::new();
        // SAFETY: an open image; a NULL snapshot diffs against nothing (every allocated
        // extent); `collect` matches the callback type and `runs` outlives the call.
        let rc = unsafe {
            (self.api().rbd_diff_iterate2)(
                self.handle,
                std::ptr::null(),
                offset,
                len,
                1,
                0,
                collect,
                (&mut runs as *mut Vec<(u64, u64)>).cast(),
            )
        };
        check(
            i64::from(rc),
            &format_args!(
                "RBD image {}: allocation map of {offset}+{len}",
                self.spec()
            ),
        )?;
        runs.sort_unstable();
        Ok(runs)
    }
}

impl Drop for Image {
    fn drop(&mut self) {
        // SAFETY: the handle came from rbd_open and is closed exactly once; no request is in
        // flight (every call waits for its completion).
        unsafe { (self.api().rbd_close)(self.handle) };
        if self.doomed {
            // Best effort: an image that could not be removed is found again by its
            // catalog's leftovers.
            let _ = self.pool.remove_image(&self.name);
        }
    }
}

/// What a request submitted without waiting shares with librbd's callback: the buffer
/// (librbd reads or writes it until the request completes), the result, and the waker of
/// the task that waits. librbd holds one reference from submission until its callback.
struct InFlight {
    /// The image, kept open until every request on it has completed.
    image: std::sync::Arc<Image>,
    /// What the request is, for the message of an error.
    op: Op,
    /// Taken by the future once the request has completed; untouched before.
    buf: std::sync::Mutex<Option<store::submit::Owned>>,
    done: std::sync::atomic::AtomicBool,
    result: std::sync::atomic::AtomicI64,
    waker: std::sync::Mutex<Option<std::task::Waker>>,
}

/// A request submitted without waiting, for its error message (formatted only on error).
#[derive(Debug, Clone, Copy)]
struct Op {
    kind: Kind,
    offset: u64,
    len: usize,
}

#[derive(Debug, Clone, Copy)]
enum Kind {
    Read,
    Write,
    Flush,
}

impl Op {
    fn describe(self, image: &Image) -> String {
        let Op { kind, offset, len } = self;
        match kind {
            Kind::Read => format!("RBD image {}: read {offset}+{len}", image.spec()),
            Kind::Write => format!("RBD image {}: write {offset}+{len}", image.spec()),
            Kind::Flush => format!("RBD image {}: flush", image.spec()),
        }
    }
}

/// librbd's completion callback: records the result, releases the completion and wakes the
/// waiting task. It never blocks: the two locks it takes are held by others only for a
/// pointer swap.
unsafe extern "C" fn on_complete(completion: Handle, arg: *mut c_void) {
    // SAFETY: `arg` is the reference `submit_owned` gave librbd with `Arc::into_raw`, handed
    // back exactly once, here.
    let inflight = unsafe { std::sync::Arc::from_raw(arg.cast::<InFlight>()) };
    let api = inflight.image.api();
    // SAFETY: the completion is complete (this is its callback); read, then released once.
    let value = unsafe { (api.rbd_aio_get_return_value)(completion) };
    // SAFETY: as above; librbd allows the release from the completion's own callback.
    unsafe { (api.rbd_aio_release)(completion) };
    inflight.finish(value as i64);
    // This may be the last reference, and with it the image's and the buffer's: closing an
    // image (rbd_close) on librbd's own thread would wait for that thread, and a buffer's
    // owner may do anything when dropped. The reaper drops it instead.
    reaper(inflight);
}

impl InFlight {
    /// Records the result and wakes the task that waits, if any.
    fn finish(&self, value: i64) {
        self.result
            .store(value, std::sync::atomic::Ordering::Relaxed);
        self.done.store(true, std::sync::atomic::Ordering::Release);
        let waker = self.waker.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(w) = waker {
            w.wake();
        }
    }
}

/// Drops what a completion callback must not drop itself, on a thread of its own (a send
/// on an unbounded channel: the callback never waits).
fn reaper(inflight: std::sync::Arc<InFlight>) {
    static REAPER: OnceLock<std::sync::mpsc::Sender<std::sync::Arc<InFlight>>> = OnceLock::new();
    let tx = REAPER.get_or_init(|| {
        let (tx, rx) = std::sync::mpsc::channel::<std::sync::Arc<InFlight>>();
        // Without the thread, sends fail and the references are kept (leaked) below.
        let _ = std::thread::Builder::new()
            .name("rbd-reaper".into())
            .spawn(move || rx.into_iter().for_each(drop));
        tx
    });
    if let Err(e) = tx.send(inflight) {
        // The reaper is gone: keep the reference rather than drop it on this thread.
        std::mem::forget(e.0);
    }
}

/// A request submitted without waiting ([`Image::read_owned`], [`Image::write_owned`],
/// [`Image::flush_owned`]): a future of librbd's result and the request's buffer back.
/// Dropping it before the request completes is safe: the buffer stays alive, and the image
/// open, until librbd's callback.
pub struct Submitted {
    inflight: std::sync::Arc<InFlight>,
}

impl std::future::Future for Submitted {
    /// librbd's result (bytes read for a read) and the buffer (None for a flush).
    type Output = (std::io::Result<i64>, Option<store::submit::Owned>);

    fn poll(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        let ready = |s: &Self| {
            let f = &s.inflight;
            let buf = f.buf.lock().unwrap_or_else(|p| p.into_inner()).take();
            let value = f.result.load(std::sync::atomic::Ordering::Relaxed);
            let result = if value >= 0 {
                Ok(value)
            } else {
                check(value, &f.op.describe(&f.image))
            };
            std::task::Poll::Ready((result, buf))
        };
        let done = || {
            self.inflight
                .done
                .load(std::sync::atomic::Ordering::Acquire)
        };
        if done() {
            return ready(&self);
        }
        *self
            .inflight
            .waker
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(cx.waker().clone());
        // Completed between the first look and the waker's store: the callback found no
        // waker to wake.
        if done() {
            return ready(&self);
        }
        std::task::Poll::Pending
    }
}

impl Image {
    /// Reads `buf.bytes().len()` bytes at `offset` into `buf`, which the request owns until
    /// it completes; the future gives it back with the bytes read. Many may be in flight. A
    /// request librbd refuses at submission completes at once with the error.
    pub fn read_owned(
        self: &std::sync::Arc<Self>,
        buf: store::submit::Owned,
        offset: u64,
    ) -> Submitted {
        self.submit_owned(Some(buf), Kind::Read, offset, |handle, ptr, len, c| {
            // SAFETY: `ptr` is `len` writable bytes owned by the request until librbd's
            // callback (see `submit_owned`).
            unsafe { (self.api().rbd_aio_read)(handle, offset, len, ptr.cast(), c) }
        })
    }

    /// Writes all of `buf.bytes()` at `offset`; the request owns `buf` until it completes,
    /// and the future gives it back. Many may be in flight.
    pub fn write_owned(
        self: &std::sync::Arc<Self>,
        buf: store::submit::Owned,
        offset: u64,
    ) -> Submitted {
        self.submit_owned(Some(buf), Kind::Write, offset, |handle, ptr, len, c| {
            // SAFETY: `ptr` is `len` readable bytes owned by the request until librbd's
            // callback (see `submit_owned`).
            unsafe { (self.api().rbd_aio_write)(handle, offset, len, ptr.cast_const().cast(), c) }
        })
    }

    /// Makes every write completed before the call durable in the cluster, without waiting.
    pub fn flush_owned(self: &std::sync::Arc<Self>) -> Submitted {
        self.submit_owned(None, Kind::Flush, 0, |handle, _, _, c| {
            // SAFETY: an open image; no buffer.
            unsafe { (self.api().rbd_aio_flush)(handle, c) }
        })
    }

    /// Submits one request on `buf` with `submit(image, pointer, length, completion)`. The
    /// buffer moves into the request's shared state, where its bytes do not move (the
    /// [`store::submit::IoBuf`] contract); librbd holds a reference to that state until its
    /// callback. A request refused at submission is complete at once, with its error.
    fn submit_owned(
        self: &std::sync::Arc<Self>,
        mut buf: Option<store::submit::Owned>,
        kind: Kind,
        offset: u64,
        submit: impl FnOnce(Handle, *mut u8, usize, Handle) -> c_int,
    ) -> Submitted {
        let (ptr, len) = match buf.as_mut() {
            Some(b) => {
                let bytes = b.bytes();
                (bytes.as_mut_ptr(), bytes.len())
            }
            None => (std::ptr::null_mut(), 0),
        };
        let inflight = std::sync::Arc::new(InFlight {
            image: std::sync::Arc::clone(self),
            op: Op { kind, offset, len },
            buf: std::sync::Mutex::new(buf),
            done: std::sync::atomic::AtomicBool::new(false),
            result: std::sync::atomic::AtomicI64::new(0),
            waker: std::sync::Mutex::new(None),
        });
        let api = self.api();
        let arg = std::sync::Arc::into_raw(std::sync::Arc::clone(&inflight)) as *mut c_void;
        let mut completion: Handle = std::ptr::null_mut();
        // SAFETY: `on_complete` matches librbd's callback type and `arg` is a live reference
        // it hands back once; `completion` is a valid out-pointer.
        let mut rc =
            unsafe { (api.rbd_aio_create_completion)(arg, Some(on_complete), &mut completion) };
        if rc >= 0 {
            // The buffer's bytes stay where they are: it is inside `inflight` and nobody
            // touches it before the callback.
            rc = submit(self.handle, ptr, len, completion);
        }
        if rc < 0 {
            if !completion.is_null() {
                // SAFETY: a completion never submitted, released once.
                unsafe { (api.rbd_aio_release)(completion) };
            }
            // SAFETY: librbd will never call back: the reference given to it comes back.
            drop(unsafe { std::sync::Arc::from_raw(arg.cast::<InFlight>()) });
            inflight.finish(i64::from(rc));
        }
        Submitted { inflight }
    }
}
