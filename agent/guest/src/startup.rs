//! What the agent still does after it began serving (later modules, the
//! modules disk, the shared filesystem, the pod's namespaces), and the two
//! facts the host may ask about it: whether that work is done (settled: a
//! template VM is saved only then, so no clone repeats it) and whether the
//! VM was personalized (a template's clone mounts the shared filesystem
//! only then: QEMU cannot save a VM whose 9p export is mounted).

use std::sync::{
    atomic::{AtomicBool, Ordering},
    Arc,
};

use tokio::sync::watch;

#[derive(Debug, Clone)]
pub struct Startup {
    settled: Arc<AtomicBool>,
    personalized: Arc<watch::Sender<bool>>,
    /// Booted as a template (`vc.template`): its clones resume this memory.
    template: bool,
}

impl Startup {
    pub fn new(cmdline: &str) -> Self {
        Self {
            settled: Arc::default(),
            personalized: Arc::new(watch::channel(false).0),
            template: cmdline
                .split_whitespace()
                .any(|p| p == agent::TEMPLATE_PARAM),
        }
    }

    /// Booted as a template (its clones resume its memory, so they are
    /// templates too).
    pub fn is_template(&self) -> bool {
        self.template
    }

    pub fn settled(&self) -> bool {
        self.settled.load(Ordering::Acquire)
    }

    pub fn mark_settled(&self) {
        self.settled.store(true, Ordering::Release);
    }

    pub fn mark_personalized(&self) {
        self.personalized.send_replace(true);
    }

    /// Returns when the shared filesystem may be mounted: at once, except
    /// in a template VM and its clones, where only a personalized clone
    /// mounts it.
    pub async fn may_mount_shared(&self) {
        if self.template {
            let mut rx = self.personalized.subscribe();
            // The sender lives as long as `self`: this never errs.
            let _ = rx.wait_for(|done| *done).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_template_mounts_only_once_personalized() {
        let plain = Startup::new("console=hvc0 vc.channel=serial");
        // Not a template: no wait.
        plain.may_mount_shared().await;

        let template = Startup::new("console=hvc0 vc.template");
        let waiting = {
            let t = template.clone();
            tokio::spawn(async move { t.may_mount_shared().await })
        };
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished());
        template.mark_personalized();
        waiting.await.expect("mounts after Personalize");

        assert!(!template.settled());
        template.mark_settled();
        assert!(template.settled());
    }
}
