//! AddInterface / RemoveInterface: a NIC hot-plugged into a running sandbox
//! (a tap the caller opened, like at create) and taken out again; the guest
//! configures it as at boot. ListInterfaces / ListRoutes ask the guest.

use crate::{
    network::{NetInterface, NetRoute, SandboxNetwork},
    sandbox::Runtime,
    state::SandboxState,
    Error, Result,
};

impl Runtime {
    /// Hot-plugs `nic` (its tap descriptor) and gives the guest its MAC,
    /// name, MTU and addresses; returns the interface as the guest reports it.
    pub async fn add_interface(&self, sandbox_id: &str, nic: NetInterface) -> Result<NetInterface> {
        let check = SandboxNetwork {
            interfaces: vec![nic.clone()],
            ..Default::default()
        };
        check.validate()?;
        let mut s = self.locked(sandbox_id).await?;
        if !matches!(s.record.state, SandboxState::Ready | SandboxState::Running) {
            return Err(Error::WrongState {
                id: sandbox_id.into(),
                action: "add an interface to",
                state: s.record.state,
                hint: "",
            });
        }
        if s.record
            .network
            .interfaces
            .iter()
            .any(|i| i.name == nic.name || i.mac.eq_ignore_ascii_case(&nic.mac))
        {
            return Err(Error::InvalidNetwork {
                detail: format!(
                    "sandbox {sandbox_id} already has an interface named {} or with MAC {}",
                    nic.name, nic.mac
                ),
            });
        }
        let vm = s.vm()?.clone();
        let Some(hw) = nic.vm_nic() else {
            return Err(Error::InvalidNetwork {
                detail: "interfaces[0] has no tap descriptor".into(),
            });
        };
        vm.add_nic(&hw).await.map_err(|source| Error::Hypervisor {
            id: sandbox_id.into(),
            source,
        })?;
        let configured = async {
            self.agent(sandbox_id, vm.as_ref())
                .await?
                .update_interface(&nic)
                .await
                .map_err(|e| Error::Agent {
                    id: sandbox_id.into(),
                    call: "UpdateInterface",
                    detail: e.detail,
                })
        }
        .await;
        let guest = match configured {
            Ok(guest) => guest,
            Err(err) => {
                if let Err(undo) = vm.remove_nic(&nic.mac).await {
                    tracing::error!(sandbox = %sandbox_id, "undo add NIC: {undo}");
                }
                s.record.vm = Some(vm.state());
                let _ = self.inner.store.save(&s.record);
                return Err(err);
            }
        };
        s.record
            .network
            .interfaces
            .push(NetInterface { tap: None, ..nic });
        s.record.vm = Some(vm.state());
        self.inner.store.save(&s.record)?;
        Ok(guest)
    }

    /// Takes the hot-plugged interface `name` out of the VM (routes over it
    /// go with it).
    pub async fn remove_interface(&self, sandbox_id: &str, name: &str) -> Result<()> {
        let mut s = self.locked(sandbox_id).await?;
        let idx = s
            .record
            .network
            .interfaces
            .iter()
            .position(|i| i.name == name)
            .ok_or_else(|| Error::InvalidNetwork {
                detail: format!("sandbox {sandbox_id} has no interface {name:?}"),
            })?;
        let mac = s.record.network.interfaces[idx].mac.clone();
        let vm = s.vm()?.clone();
        vm.remove_nic(&mac)
            .await
            .map_err(|source| Error::Hypervisor {
                id: sandbox_id.into(),
                source,
            })?;
        s.record.network.interfaces.remove(idx);
        s.record.network.routes.retain(|r| r.device != name);
        s.record.vm = Some(vm.state());
        self.inner.store.save(&s.record)
    }

    /// The guest's interfaces and routes as it sees them now.
    pub async fn guest_network(
        &self,
        sandbox_id: &str,
    ) -> Result<(Vec<NetInterface>, Vec<NetRoute>)> {
        let vm = {
            let s = self.locked(sandbox_id).await?;
            s.vm()?.clone()
        };
        let agent = self.agent(sandbox_id, vm.as_ref()).await?;
        let failed = |call: &'static str| {
            move |e: crate::AgentError| Error::Agent {
                id: sandbox_id.into(),
                call,
                detail: e.detail,
            }
        };
        Ok((
            agent
                .list_interfaces()
                .await
                .map_err(failed("ListInterfaces"))?,
            agent.list_routes().await.map_err(failed("ListRoutes"))?,
        ))
    }
}
