// Minimal and public: one region, pay-as-you-go, the app scaling to zero (no always-ready instance; the first call
// after idling waits for a cold start). The cheapest gateway at rest (docs/deploy.md#what-it-costs-at-rest).
// azd: copy this file over main.bicepparam (azd reads main.bicepparam), or with the Azure CLI:
//   az deployment group create -g rg-aigw -f bicep/main.bicep -p bicep/minimal.bicepparam
using './main.bicep'

param environmentName = readEnvironmentVariable('AZURE_ENV_NAME', 'aigw')

// The admin who runs `python -m shared.admin` (Storage Table Data Contributor, Monitoring Reader). azd passes
// AZURE_PRINCIPAL_ID (whoever runs it) but not its type; azure.yaml's preprovision hook (tools/azd_principal.py) sets
// AZURE_PRINCIPAL_TYPE (User, or ServicePrincipal when azd is signed in as one), so by default the deployer becomes
// the admin. With no type known, no admin: a wrong type would fail the deployment (UnmatchedPrincipalType).
// GATEWAY_ADMIN_PRINCIPAL_ID names someone else (with GATEWAY_ADMIN_PRINCIPAL_TYPE: User, Group or
// ServicePrincipal; default Group), or 'none' for no admin.
var adminOverride = readEnvironmentVariable('GATEWAY_ADMIN_PRINCIPAL_ID', '')
var deployerType = readEnvironmentVariable('AZURE_PRINCIPAL_TYPE', '')
param adminPrincipalId = adminOverride == 'none' ? '' : (empty(adminOverride) ? (empty(deployerType) ? '' : readEnvironmentVariable('AZURE_PRINCIPAL_ID', '')) : adminOverride)
param adminPrincipalType = empty(adminOverride) ? (empty(deployerType) ? 'User' : deployerType) : readEnvironmentVariable('GATEWAY_ADMIN_PRINCIPAL_TYPE', 'Group')

param backendRegions = [
  {
    id: 'swedencentral'
    location: 'swedencentral'
    priority: 1
    weight: 1
    deployments: [
      {
        name: 'gpt-5.4-mini'
        model: 'gpt-5.4-mini'
        modelVersion: '2026-03-17'
        sku: 'GlobalStandard'
        capacity: 100
      }
      {
        name: 'text-embedding-3-small'
        model: 'text-embedding-3-small'
        modelVersion: '1'
        sku: 'GlobalStandard'
        capacity: 50
      }
    ]
  }
]

param alwaysReadyInstances = 0
param enablePrivateNetworking = false
