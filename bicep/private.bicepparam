// Private networking: the Function App integrated with a virtual network (all outbound through it, a NAT gateway
// for the internet), private endpoints for storage, a new Azure OpenAI account and an existing one, and the gateway
// itself reachable only through its own private endpoint (callers in the network, a peered one, or over VPN).
// The existing account's private endpoint connection is requested, not approved: its owner approves it
// (docs/deploy.md#private-networking). Bring your hub's private DNS zones with existingPrivateDnsZoneIds.
//   az deployment group create -g rg-aigw -f bicep/main.bicep -p bicep/private.bicepparam
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
        sku: 'DataZoneStandard'
        capacity: 50
      }
    ]
  }
  {
    id: 'francecentral-shared'
    location: 'francecentral'
    priority: 2
    weight: 1
    existingAccount: {
      name: readEnvironmentVariable('GATEWAY_SHARED_ACCOUNT', 'contoso-openai-francecentral')
      resourceGroup: readEnvironmentVariable('GATEWAY_SHARED_ACCOUNT_GROUP', 'rg-openai')
      // The default: a connection request the account's owner approves. 'auto' needs the approve right there.
      privateEndpointApproval: 'manual'
    }
    deployments: [
      {
        name: 'gpt-5.4-mini'
      }
      {
        name: 'text-embedding-3-small'
      }
    ]
  }
]

param enablePrivateNetworking = true
param appInboundAccess = 'private'
param createNatGateway = true
// For example { blob: '/subscriptions/.../privateDnsZones/privatelink.blob.core.windows.net', openai: '...' }.
param existingPrivateDnsZoneIds = {}
// Zone redundancy: Flex Consumption requires at least two always-ready instances with it (both billed while idle).
param zoneRedundant = true
param alwaysReadyInstances = 2
