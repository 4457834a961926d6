// Existing Azure OpenAI accounts: nothing is created in their regions; the gateway's identity is granted Cognitive
// Services OpenAI User on each (you need the right to assign roles there). Only the deployment names matter: they
// must exist in the accounts. Give the accounts with environment variables or edit the defaults below.
//   az deployment group create -g rg-aigw -f bicep/main.bicep -p bicep/existing-accounts.bicepparam
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
    id: 'eastus2'
    location: 'eastus2'
    priority: 1
    weight: 1
    existingAccount: {
      name: readEnvironmentVariable('GATEWAY_PRIMARY_ACCOUNT', 'contoso-openai-eastus2')
      resourceGroup: readEnvironmentVariable('GATEWAY_PRIMARY_ACCOUNT_GROUP', 'rg-openai')
    }
    deployments: [
      {
        name: 'gpt-5.4-mini'
        deploymentName: 'gpt-5.4-mini-2026-03-17'
      }
      {
        name: 'text-embedding-3-small'
      }
    ]
  }
  {
    id: 'westus3'
    location: 'westus3'
    priority: 2
    weight: 1
    existingAccount: {
      name: readEnvironmentVariable('GATEWAY_SECONDARY_ACCOUNT', 'contoso-openai-westus3')
      resourceGroup: readEnvironmentVariable('GATEWAY_SECONDARY_ACCOUNT_GROUP', 'rg-openai')
      // When the custom subdomain is not the account's name.
      endpoint: readEnvironmentVariable('GATEWAY_SECONDARY_ENDPOINT', 'https://contoso-westus3.openai.azure.com')
    }
    deployments: [
      {
        name: 'gpt-5.4-mini'
        deploymentName: 'gpt-5.4-mini-2026-03-17'
      }
      {
        name: 'text-embedding-3-small'
      }
    ]
  }
]

param alwaysReadyInstances = 1
param enablePrivateNetworking = false
