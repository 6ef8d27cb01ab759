//! A bounded single-consumer queue that holds no memory while empty.
//!
//! Every stream of every connection has a send queue, and most connections are idle: a
//! tokio `mpsc` channel allocates its first block (32 slots) when it is created, about
//! 5 KB per stream with the relay's messages. This queue allocates only while messages
//! wait and gives the memory back once it has drained.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

/// A drained queue keeps at most this many slots of capacity.
const KEEP_CAPACITY: usize = 8;

struct Inner<T> {
    state: Mutex<State<T>>,
    ready: Notify,
    max: usize,
}

struct State<T> {
    items: VecDeque<T>,
    /// Every sender is gone: the receiver ends after the last item.
    closed: bool,
}

/// The sending half; cheap to clone. The queue closes when the last clone is dropped.
pub struct Sender<T> {
    handle: Arc<SenderHandle<T>>,
}

impl<T> Clone for Sender<T> {
    fn clone(&self) -> Self {
        Sender {
            handle: self.handle.clone(),
        }
    }
}

struct SenderHandle<T> {
    inner: Arc<Inner<T>>,
}

impl<T> Drop for SenderHandle<T> {
    fn drop(&mut self) {
        if let Ok(mut state) = self.inner.state.lock() {
            state.closed = true;
        }
        self.inner.ready.notify_one();
    }
}

/// The receiving half.
pub struct Receiver<T> {
    inner: Arc<Inner<T>>,
}

/// A queue of at most `max` items.
pub fn bounded<T>(max: usize) -> (Sender<T>, Receiver<T>) {
    let inner = Arc::new(Inner {
        state: Mutex::new(State {
            items: VecDeque::new(),
            closed: false,
        }),
        ready: Notify::new(),
        max,
    });
    (
        Sender {
            handle: Arc::new(SenderHandle {
                inner: inner.clone(),
            }),
        },
        Receiver { inner },
    )
}

impl<T> Sender<T> {
    /// Queues `item`; gives it back if the queue is full or the receiver is gone.
    pub fn try_send(&self, item: T) -> Result<(), T> {
        let inner = &self.handle.inner;
        {
            let Ok(mut state) = inner.state.lock() else {
                return Err(item);
            };
            if state.closed || state.items.len() >= inner.max {
                return Err(item);
            }
            state.items.push_back(item);
        }
        inner.ready.notify_one();
        Ok(())
    }
}

impl<T> State<T> {
    fn pop(&mut self) -> Option<T> {
        let item = self.items.pop_front()?;
        if self.items.is_empty() && self.items.capacity() > KEEP_CAPACITY {
            self.items.shrink_to(KEEP_CAPACITY);
        }
        Some(item)
    }
}

impl<T> Receiver<T> {
    /// Waits for at least one item, then moves up to `max` queued items (at least one)
    /// to the back of `out`, under one lock; `false` once every sender is gone and the
    /// queue is empty.
    pub async fn recv_many(&mut self, out: &mut VecDeque<T>, max: usize) -> bool {
        loop {
            {
                let Ok(mut state) = self.inner.state.lock() else {
                    return false;
                };
                if !state.items.is_empty() {
                    for _ in 0..max.max(1) {
                        match state.pop() {
                            Some(item) => out.push_back(item),
                            None => break,
                        }
                    }
                    return true;
                }
                if state.closed {
                    return false;
                }
            }
            // One consumer: a notification sent between the check and here is kept as a
            // permit, so none is lost.
            self.inner.ready.notified().await;
        }
    }
}

impl<T> Receiver<T> {
    /// Closes the queue (later sends fail) and hands back what is still in it.
    pub fn close(&mut self) -> VecDeque<T> {
        match self.inner.state.lock() {
            Ok(mut state) => {
                state.closed = true;
                std::mem::take(&mut state.items)
            }
            Err(_) => VecDeque::new(),
        }
    }
}

impl<T> Drop for Receiver<T> {
    fn drop(&mut self) {
        // Later sends fail instead of queueing for nobody.
        if let Ok(mut state) = self.inner.state.lock() {
            state.closed = true;
            state.items.clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn recv<T>(rx: &mut Receiver<T>) -> Option<T> {
        let mut out = VecDeque::new();
        if rx.recv_many(&mut out, 1).await {
            assert_eq!(out.len(), 1);
        }
        out.pop_front()
    }

    #[tokio::test]
    async fn recv_many_takes_what_is_queued_up_to_its_limit() {
        let (tx, mut rx) = bounded::<u32>(8);
        for i in 1..=5 {
            assert!(tx.try_send(i).is_ok());
        }
        let mut out = VecDeque::new();
        assert!(rx.recv_many(&mut out, 3).await);
        assert_eq!(out, [1, 2, 3]);
        assert!(rx.recv_many(&mut out, 3).await);
        assert_eq!(out, [1, 2, 3, 4, 5]);
        // It waits for the next item, and ends once the senders are gone.
        let waiting = tokio::spawn(async move {
            let mut out = VecDeque::new();
            let got = rx.recv_many(&mut out, 3).await;
            (got, out, rx.recv_many(&mut VecDeque::new(), 3).await)
        });
        tokio::task::yield_now().await;
        assert!(tx.try_send(6).is_ok());
        drop(tx);
        let (got, out, after) = waiting.await.unwrap();
        assert!(got);
        assert_eq!(out, [6]);
        assert!(!after);
    }

    #[test]
    fn close_hands_back_what_is_queued_and_refuses_later_sends() {
        let (tx, mut rx) = bounded::<u32>(8);
        assert!(tx.try_send(1).is_ok());
        assert!(tx.try_send(2).is_ok());
        assert_eq!(rx.close(), [1, 2]);
        assert_eq!(tx.try_send(3), Err(3));
        assert!(rx.close().is_empty());
    }

    #[tokio::test]
    async fn items_arrive_in_order_until_every_sender_is_gone() {
        let (tx, mut rx) = bounded::<u32>(3);
        let other = tx.clone();
        assert!(tx.try_send(1).is_ok());
        assert!(other.try_send(2).is_ok());
        assert!(tx.try_send(3).is_ok());
        assert_eq!(tx.try_send(4), Err(4), "full");
        assert_eq!(recv(&mut rx).await, Some(1));
        assert!(tx.try_send(4).is_ok(), "room again");
        drop(tx);
        assert_eq!(recv(&mut rx).await, Some(2));
        drop(other);
        assert_eq!(recv(&mut rx).await, Some(3));
        assert_eq!(recv(&mut rx).await, Some(4));
        assert_eq!(recv(&mut rx).await, None);
    }

    #[tokio::test]
    async fn a_waiting_receiver_wakes_for_a_send_and_for_the_close() {
        let (tx, mut rx) = bounded::<u32>(8);
        let waiter = tokio::spawn(async move {
            let first = recv(&mut rx).await;
            let second = recv(&mut rx).await;
            (first, second)
        });
        tokio::task::yield_now().await;
        assert!(tx.try_send(7).is_ok());
        tokio::task::yield_now().await;
        drop(tx);
        assert_eq!(waiter.await.unwrap(), (Some(7), None));
    }

    #[tokio::test]
    async fn a_drained_queue_gives_its_memory_back_and_a_dropped_receiver_refuses() {
        let (tx, mut rx) = bounded::<u64>(1000);
        for i in 0..500 {
            assert!(tx.try_send(i).is_ok());
        }
        for _ in 0..500 {
            recv(&mut rx).await.unwrap();
        }
        assert!(rx.inner.state.lock().unwrap().items.capacity() <= KEEP_CAPACITY);
        drop(rx);
        assert_eq!(tx.try_send(1), Err(1));
    }
}
