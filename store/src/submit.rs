//! The submission interface of engines that complete requests on threads of their own (the
//! Ceph RBD engine: librbd's aio calls complete on librbd's threads).
//!
//! A request owns its buffer ([`IoBuf`]) from submission until its completion hands it back,
//! whatever happens to whoever asked for it: a caller that goes away (a dropped future, a
//! closed NBD connection) never frees memory the engine still reads or writes. Completions
//! are futures; the engine's completion only wakes the task that waits, so any async runtime
//! drives them and no engine thread ever runs the caller's code.
//!
//! An engine that has this interface still implements [`BackingStore`](crate::BackingStore)
//! (submit, then wait): header code and long operations use that. Only the data path (the
//! NBD server's reads, writes and flushes) submits without waiting.

use std::any::Any;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};

/// A buffer a request owns while it is in flight. Its bytes must stay where they are while
/// the engine has it (a heap buffer behind a pointer does; an inline array does not).
pub trait IoBuf: Send + 'static {
    /// The bytes the request reads into or writes from.
    fn bytes(&mut self) -> &mut [u8];
    /// The buffer as `Any`, so that the caller gets its own type back after completion.
    fn into_any(self: Box<Self>) -> Box<dyn Any + Send>;
}

impl IoBuf for Vec<u8> {
    fn bytes(&mut self) -> &mut [u8] {
        self
    }
    fn into_any(self: Box<Self>) -> Box<dyn Any + Send> {
        self
    }
}

/// A buffer handed to an engine.
pub type Owned = Box<dyn IoBuf>;

/// A read or write in flight: its result and its buffer back.
pub type Transfer = Pin<Box<dyn Future<Output = (io::Result<()>, Owned)> + Send>>;

/// A flush in flight.
pub type Flushing = Pin<Box<dyn Future<Output = io::Result<()>> + Send>>;

/// The asynchronous data path of a store. The contract is [`BackingStore`]'s
/// (crate::BackingStore), with these differences:
/// - the range of a read or write lies within [`len`](crate::BackingStore::len) (writes do
///   not grow the store here: the volume above never writes past its end);
/// - a write is complete when its future yields `Ok`; a flush makes durable every write
///   complete before the flush was submitted, through either interface;
/// - many requests may be in flight at once, from any thread; each is independent of the
///   others and completes in any order;
/// - dropping a future before it completes leaves the request running: the engine keeps
///   the buffer until it is done with it, then drops it (on any thread).
pub trait Submit: Send + Sync {
    /// Reads `buf.bytes().len()` bytes at `offset` into `buf`.
    fn read_owned(&self, buf: Owned, offset: u64) -> Transfer;
    /// Writes all of `buf.bytes()` at `offset`.
    fn write_owned(&self, buf: Owned, offset: u64) -> Transfer;
    /// Makes every write completed before the call durable.
    fn flush_owned(&self) -> Flushing;
}

/// Runs a future to completion on the calling thread (parks between wake-ups): for tests and
/// for synchronous callers of an asynchronous engine.
pub fn block_on<F: Future>(fut: F) -> F::Output {
    struct Unpark(std::thread::Thread);
    impl Wake for Unpark {
        fn wake(self: Arc<Self>) {
            self.0.unpark();
        }
        fn wake_by_ref(self: &Arc<Self>) {
            self.0.unpark();
        }
    }
    let waker = Waker::from(Arc::new(Unpark(std::thread::current())));
    let mut cx = Context::from_waker(&waker);
    let mut fut = std::pin::pin!(fut);
    loop {
        if let Poll::Ready(v) = fut.as_mut().poll(&mut cx) {
            return v;
        }
        std::thread::park();
    }
}

/// Gives an owned buffer back as the caller's type `T` (which it was submitted as).
///
/// # Panics
/// If the buffer is not a `T`: an engine gave back a buffer other than the one it was handed.
pub fn downcast<T: Any>(buf: Owned) -> Box<T> {
    match buf.into_any().downcast::<T>() {
        Ok(b) => b,
        Err(_) => panic!("an engine gave back a buffer it was not handed"),
    }
}
